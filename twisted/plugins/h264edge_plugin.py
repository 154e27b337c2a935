from twisted.application.service import ServiceMaker

h264edge = ServiceMaker(
    "h264edge", "h264edge.tap", "Edge cache for H.264/MP4 video with ?start= seeking", "h264edge"
)
