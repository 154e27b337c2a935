"""Plans: lengths from parts, slicing any plan like an HTTP Range."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from h264edge.plan import Literal, Plan, Span

SOURCE = bytes(range(256)) * 40


def read(key: str, offset: int, length: int) -> bytes:
    assert key == "k"
    return SOURCE[offset : offset + length]


parts = st.lists(
    st.one_of(
        st.binary(max_size=40).map(Literal),
        st.tuples(st.integers(0, 5000), st.integers(0, 2000)).map(
            lambda t: Span("k", t[0], min(t[1], len(SOURCE) - t[0]))
        ),
    ),
    max_size=8,
)


class PlanTests(SynchronousTestCase):
    def test_whole_is_one_span(self) -> None:
        plan = Plan.whole("k", 100)
        self.assertEqual(plan.parts, (Span("k", 0, 100),))
        self.assertEqual(plan.length, 100)

    def test_neighbours_merge_and_empty_parts_vanish(self) -> None:
        plan = Plan((Literal(b"ab"), Literal(b""), Literal(b"c"), Span("k", 0, 5), Span("k", 5, 5)))
        self.assertEqual(plan.parts, (Literal(b"abc"), Span("k", 0, 10)))

    def test_slice_out_of_plan_raises(self) -> None:
        plan = Plan.whole("k", 10)
        self.assertRaises(ValueError, plan.slice, 10, 20)
        self.assertRaises(ValueError, plan.slice, 5, 4)

    def test_negative_span_is_refused(self) -> None:
        self.assertRaises(ValueError, Span, "k", -1, 5)
        self.assertRaises(ValueError, Span, "k", 0, -5)

    @settings(max_examples=300, deadline=None)
    @given(parts, st.integers(0, 10000), st.integers(0, 10000))
    def test_slice_renders_the_same_bytes_as_slicing_the_render(self, parts: list, a: int, b: int) -> None:
        plan = Plan(tuple(parts))
        whole = plan.render(read)
        self.assertEqual(len(whole), plan.length)
        if plan.length == 0:
            return
        first = a % plan.length
        last = first + b
        sliced = plan.slice(first, last)
        self.assertEqual(sliced.render(read), whole[first : last + 1])
        self.assertEqual(sliced.length, min(last, plan.length - 1) - first + 1)
