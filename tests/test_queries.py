"""
Query strings travel as sent: in the cache key and towards the origin, byte for byte, with only the
pseudo-streaming start/end taken out (on MP4/FLV paths).  The origin here serves a different body
for each exact query, so a shared cache entry or a rewritten query shows as wrong bytes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.threads import deferToThread

from tests.edgekit import EdgeTestCase, RawClient, random_bytes


def fetch(port: int, target: str) -> Any:
    client = RawClient(port)
    try:
        client.send_get(target)
        return client.read_response()
    finally:
        client.close()


class QueryBytesTests(EdgeTestCase):
    async def get_raw(self, target: str) -> Any:
        return await deferToThread(fetch, int(self.edge_port.getHost().port), target)

    async def test_non_utf8_queries_are_three_objects_and_reach_the_origin_unchanged(self) -> None:
        queries = ["sig=%ff", "sig=%fe", "sig=%EF%BF%BD"]
        bodies = {q: random_bytes(2000, seed=n) for n, q in enumerate(queries)}
        for query, body in bodies.items():
            self.origin.add("/q.bin?" + query, body)
        for _ in range(2):  # a miss, then a hit: each from its own entry
            for query, body in bodies.items():
                answer = await self.get_raw("/q.bin?" + query)
                self.assertEqual(answer.status, 200, query)
                self.assertTrue(answer.body == body, f"{query}: wrong bytes")
        self.assertEqual([entry.path for entry in self.origin.log], ["/q.bin?" + q for q in queries])
        self.assertEqual(len(self.store), 3)

    async def test_other_parameters_keep_their_order_and_encoding_and_start_end_go(self) -> None:
        data = random_bytes(3000)
        self.origin.add("/v.flv", data)
        sent = "/v.flv?b=2&start=0&a=%41+1&&c=%2b&end=9&z"
        answer = await self.get_raw(sent)
        self.assertEqual(answer.status, 200)
        self.assertEqual([entry.path for entry in self.origin.log], ["/v.flv?b=2&a=%41+1&&c=%2b&z"])
        self.assertEqual(self.store.keys_lru(), ["/v.flv?b=2&a=%41+1&&c=%2b&z"])

    async def test_start_and_end_are_ordinary_parameters_elsewhere(self) -> None:
        self.origin.add("/list.json?start=%ff&end=1", b"[]")
        answer = await self.get_raw("/list.json?start=%ff&end=1")
        self.assertEqual((answer.status, answer.body), (200, b"[]"))
        self.assertEqual([entry.path for entry in self.origin.log], ["/list.json?start=%ff&end=1"])
