"""The python `etcd3` client (PyPI) against a running meshkv member.

Run by tests/t71_python_etcd3.rs with MESHKV_HOST and MESHKV_PORT set.
"""
import os
import threading
import time
import unittest

import etcd3


def client():
    return etcd3.client(host=os.environ["MESHKV_HOST"], port=int(os.environ["MESHKV_PORT"]), timeout=10)


class Etcd3Client(unittest.TestCase):
    def setUp(self):
        self.c = client()

    def test_put_get_delete(self):
        self.c.put("/py/kv", "v1")
        value, meta = self.c.get("/py/kv")
        self.assertEqual(value, b"v1")
        self.assertEqual(meta.key, b"/py/kv")
        self.assertTrue(self.c.delete("/py/kv"))
        self.assertEqual(self.c.get("/py/kv"), (None, None))

    def test_watch_sees_puts_and_deletes_in_order(self):
        events, cancel = self.c.watch("/py/w")
        self.c.put("/py/w", "1")
        self.c.put("/py/w", "2")
        self.c.delete("/py/w")
        seen = []
        for ev in events:
            seen.append((type(ev).__name__, ev.value))
            if len(seen) == 3:
                break
        cancel()
        self.assertEqual(seen, [("PutEvent", b"1"), ("PutEvent", b"2"), ("DeleteEvent", b"")])

    def test_watch_prefix_and_cancel(self):
        events, cancel = self.c.watch_prefix("/py/p/")
        self.c.put("/py/p/a", "1")
        self.c.put("/py/other", "x")
        self.c.put("/py/p/b", "2")
        keys = []
        for ev in events:
            keys.append(ev.key)
            if len(keys) == 2:
                break
        self.assertEqual(keys, [b"/py/p/a", b"/py/p/b"])
        cancel()
        # After the cancel the iterator ends instead of waiting for more.
        self.c.put("/py/p/c", "3")
        rest = list(events)
        self.assertTrue(all(ev.key != b"/py/p/c" for ev in rest))

    def test_watch_callback_and_cancel_watch(self):
        got = []
        done = threading.Event()

        def callback(resp):
            for ev in resp.events:
                got.append(ev.value)
            done.set()

        watch_id = self.c.add_watch_callback("/py/cb", callback)
        self.c.put("/py/cb", "hello")
        self.assertTrue(done.wait(10))
        self.c.cancel_watch(watch_id)
        self.assertEqual(got, [b"hello"])

    def test_lease_keys_and_revoke(self):
        lease = self.c.lease(60)
        self.c.put("/py/l/a", "1", lease=lease)
        self.c.put("/py/l/b", "2", lease=lease)
        self.assertEqual(sorted(lease.keys), [b"/py/l/a", b"/py/l/b"])
        self.assertEqual(lease.granted_ttl, 60)
        self.assertTrue(0 < lease.remaining_ttl <= 60)
        lease.refresh()
        lease.revoke()
        self.assertEqual(self.c.get("/py/l/a"), (None, None))
        self.assertEqual(self.c.get("/py/l/b"), (None, None))

    def test_lease_expires(self):
        lease = self.c.lease(2)
        self.c.put("/py/exp", "1", lease=lease)
        deadline = time.time() + 6
        while time.time() < deadline and self.c.get("/py/exp")[0] is not None:
            time.sleep(0.2)
        self.assertEqual(self.c.get("/py/exp"), (None, None))

    def test_lock_excludes(self):
        lock = self.c.lock("py-lock", ttl=30)
        self.assertTrue(lock.acquire(timeout=5))
        other = client().lock("py-lock", ttl=30)
        self.assertFalse(other.acquire(timeout=1))
        lock.release()
        self.assertTrue(other.acquire(timeout=5))
        self.assertTrue(other.is_acquired())
        other.release()

    def test_transactions(self):
        self.c.put("/py/t", "old")
        ok, responses = self.c.transaction(
            compare=[self.c.transactions.value("/py/t") == "old"],
            success=[self.c.transactions.put("/py/t", "new"), self.c.transactions.get("/py/t")],
            failure=[],
        )
        self.assertTrue(ok)
        self.assertEqual(responses[1][0][0], b"new")
        ok, _ = self.c.transaction(
            compare=[self.c.transactions.version("/py/t") == 99],
            success=[],
            failure=[self.c.transactions.delete("/py/t")],
        )
        self.assertFalse(ok)
        self.assertEqual(self.c.get("/py/t"), (None, None))

    def test_get_prefix_sorted(self):
        for k in ["c", "a", "b"]:
            self.c.put("/py/s/" + k, k)
        keys = [m.key for _, m in self.c.get_prefix("/py/s/", sort_order="ascend")]
        self.assertEqual(keys, [b"/py/s/a", b"/py/s/b", b"/py/s/c"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
