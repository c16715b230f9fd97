"""vpt-serve under attack (issue 26): an HTTP request is data, never a way to hold the server. Crafted images do not
cost the inference worker more than their first frame, request bodies held at once are capped, numbers in a query
are parsed, not pattern-matched. A real server on 127.0.0.1, bounded waits, always stopped."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import save_task_checkpoint, write_image
from test_serve import read_whole_response, request

from vpt_lightning.serving.images import ImageError, decode_image
from vpt_lightning.serving.launch import running_server

pytest.importorskip("litserve")
STARTUP_SECONDS = 240
KEY = "trust-key-7"
MAX_REQUEST_BYTES = 6_000_000
MAX_BUFFERED_BYTES = 15_000_000  # two bodies of MAX_REQUEST_BYTES fit, a third does not
READ_TIMEOUT = 20


def many_page_tiff(pages: int) -> bytes:
    """A little-endian TIFF of ``pages`` 1x1 grey pages sharing one pixel byte: ~102 bytes a page, and PIL walked
    every page to count them (quadratic: 40,000 pages, 4 MB, cost ~8 s of the inference worker)."""
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8)]
    entries += [(278, 3, 1, 1), (279, 4, 1, 1)]  # width, height, 8 bits, raw, grey, strip at 8, 1 row, 1 byte
    size = 2 + 12 * len(entries) + 4
    fields = b"".join(struct.pack("<HHII", *entry) for entry in entries)
    first = 12  # after the header (8 bytes) and the pixel (padded to 4)
    pages_bytes = [
        struct.pack("<H", len(entries)) + fields + struct.pack("<I", first + (i + 1) * size if i < pages - 1 else 0)
        for i in range(pages)
    ]
    return b"II*\x00" + struct.pack("<I", first) + b"\x80\x00\x00\x00" + b"".join(pages_bytes)


def many_strip_tiff(strips: int) -> bytes:
    """A TIFF of one 1 x ``strips`` grey image in one-row strips, all pointing at the same pixel byte: 8 bytes a
    strip, and PIL builds one decoder entry per strip in Python (~1.5 s for 300,000 strips, 2.4 MB)."""
    directory = 8
    offsets = directory + 2 + 12 * 8 + 4
    counts = offsets + 4 * strips
    pixel = counts + 4 * strips
    entries = [(256, 3, 1, 1), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    entries += [(273, 4, strips, offsets), (278, 3, 1, 1), (279, 4, strips, counts)]
    fields = b"".join(struct.pack("<HHII", *entry) for entry in entries)
    head = b"II*\x00" + struct.pack("<I", directory) + struct.pack("<H", len(entries)) + fields + b"\x00" * 4
    return head + struct.pack("<I", pixel) * strips + struct.pack("<I", 1) * strips + b"\x80"


def many_frame_gif(frames: int) -> bytes:
    """A 1x1 GIF of ``frames`` frames, 15 bytes each."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame * frames + b"\x3b"


def seconds_to_decode(data: bytes) -> float:
    start = time.perf_counter()
    image = decode_image(data, "crafted")
    assert image.size == (1, 1) and image.mode == "RGB"
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "data", [many_page_tiff(40_000), many_frame_gif(1_000_000)], ids=["40k-page TIFF", "1M-frame GIF"]
)
def test_decoding_reads_the_first_frame_only(data):
    # PIL counted every page before decoding: ~8 s for the TIFF and ~1.2 s for the GIF on the 2-core test machine
    seconds = seconds_to_decode(data)
    assert seconds < 0.5


def test_a_tiff_of_too_many_strips_is_refused_before_pil_reads_them():
    data = many_strip_tiff(300_000)  # 1 x 300,000 pixels: under the pixel limit
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"^crafted: a TIFF of 300000 strips or tiles, more than 65536$") as err:
        decode_image(data, "crafted")
    assert err.value.too_large and time.perf_counter() - start < 0.5
    assert decode_image(many_strip_tiff(4096), "tall").size == (1, 4096)  # one-row strips of a 4096-row image


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    ckpt = save_task_checkpoint(root / "count.ckpt", num_classes=5, class_names=list("12345"), task_name="count")
    write_image(root / "good.png", seed=0, size=(30, 30))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
        "LIT_SERVER_API_KEY": KEY,
    }
    options = ["--accelerator", "cpu", "--max-batch-size", "4", "--batch-timeout", "0.01"]
    options += ["--max-request-bytes", str(MAX_REQUEST_BYTES), "--read-timeout", str(READ_TIMEOUT)]
    options += ["--max-buffered-bytes", str(MAX_BUFFERED_BYTES)]
    with running_server([ckpt], options, startup_timeout=STARTUP_SECONDS, env=env) as url:
        yield url, (root / "good.png").read_bytes()


def post_raw(url: str, data: bytes, results: dict, name: str, query: str = "task=count") -> None:
    start = time.monotonic()
    status, body = request(f"{url}/predict?{query}", data, "application/octet-stream", timeout=120, key=KEY)
    results[name] = (status, body, time.monotonic() - start)


def test_crafted_multi_frame_images_do_not_hold_the_worker(server):
    """Two 4 MB TIFFs of 40,000 pages and a GIF of 390,000 frames, then a good request: answered within 5 s (it
    waited ~17 s behind the page counts before)."""
    url, good = server
    tiff, gif = many_page_tiff(40_000), many_frame_gif(390_000)
    assert len(tiff) < MAX_REQUEST_BYTES and len(gif) < MAX_REQUEST_BYTES
    results: dict = {}
    attacks = [threading.Thread(target=post_raw, args=(url, d, results, n)) for n, d in (("t1", tiff), ("t2", tiff))]
    attacks.append(threading.Thread(target=post_raw, args=(url, gif, results, "gif")))
    for thread in attacks:
        thread.start()
    time.sleep(0.5)  # the crafted uploads reach the worker first
    post_raw(url, good, results, "good")
    for thread in attacks:
        thread.join(timeout=120)
    status, body, seconds = results["good"]
    assert status == 200 and body["task"] == "count"
    assert seconds < 5, f"a good request waited {seconds:.1f} s behind crafted images"
    for name in ("t1", "t2", "gif"):  # the first frame, a valid 1x1 image, is classified
        assert results[name][0] == 200 and len(results[name][1]["predictions"]) == 5, results[name]


@pytest.mark.parametrize("value", ["²", "٣", "1e3", "-1", "0", " 3", "0x10", "3.0", "", "9" * 5000])
def test_top_k_in_the_query_is_parsed_as_ascii_digits_with_bounds(server, value):
    # '²'.isdigit() is True and int('²') raises: a 500; '٣' (Arabic-Indic three) was accepted as 3; 5000 nines
    # passed isdigit() and int() refused them (Python's digit limit): a 500
    from urllib.parse import quote

    url, good = server
    results: dict = {}
    post_raw(url, good, results, "k", query=f"task=count&top_k={quote(value)}")
    status, body, _ = results["k"]
    assert status == 400, (status, body)
    assert body["detail"].startswith(f"top_k={value[:20]!r}"[:-1]) and "ASCII digits" in body["detail"], body


def test_top_k_at_its_bounds_is_served(server):
    url, good = server
    results: dict = {}
    post_raw(url, good, results, "one", query="task=count&top_k=1")
    post_raw(url, good, results, "many", query="task=count&top_k=1000000")  # clamped to the 5 classes
    assert [len(results[n][1]["predictions"]) for n in ("one", "many")] == [1, 5]


def padded_json_body(image: bytes, size: int) -> bytes:
    """A valid JSON request for ``image`` padded with spaces to ``size`` bytes."""
    body = json.dumps({"task": "count", "image": base64.b64encode(image).decode()}).encode()
    return body + b" " * (size - len(body))


def open_request(port: int, head: bytes, first: bytes = b"", timeout: float = READ_TIMEOUT + 20) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head + first)
    return sock


def post_head(length: int = None, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {KEY}\r\n{framing}\r\n\r\n"
    ).encode()


def test_bodies_over_the_buffered_cap_get_503_at_once_and_the_others_are_answered(server):
    """Two slow clients hold bodies of the largest size (12 MB of the 15 MB cap): a third such body, declared or
    chunked, is refused at once with 503 and Retry-After, unread (it used to be buffered too: 8 bodies of 16 MiB
    took +700 MB); a small request is still served, and so are the two slow ones once their bodies end."""
    url, good = server
    port = int(url.rsplit(":", 1)[1])
    body = padded_json_body(good, MAX_REQUEST_BYTES)
    slow = [open_request(port, post_head(len(body)), body[:1000]) for _ in range(2)]
    try:
        time.sleep(1)  # both are reading their bodies
        refused = []
        for head, first in ((post_head(len(body)), b""), (post_head(chunked=True), b"%x\r\n" % 3_500_000)):
            with open_request(port, head, first, timeout=5) as sock:
                start = time.monotonic()
                if first:  # a chunked body is held as it comes: past 3 MB it is over the cap (all sent is read)
                    sock.sendall(body[: MAX_BUFFERED_BYTES - 2 * MAX_REQUEST_BYTES + 100])
                refused.append((read_whole_response(sock), time.monotonic() - start))
        for answer, seconds in refused:
            assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
            assert b"retry-after: 1\r\n" in answer.lower() and b"--max-buffered-bytes" in answer, answer[:500]
            assert seconds < 3, f"refused after {seconds:.1f} s"
        results: dict = {}
        post_raw(url, good, results, "small")  # under the cap alongside the slow ones
        assert results["small"][0] == 200, results["small"]
        for sock in slow:
            sock.sendall(body[1000:])
        for sock in slow:
            answer = read_whole_response(sock)
            assert answer.startswith(b"HTTP/1.1 200") and b'"predictions"' in answer, answer[:300]
    finally:
        for sock in slow:
            sock.close()
    status, answer = request(url + "/predict", body, timeout=60, key=KEY)  # the budget was given back
    assert status == 200 and answer["task"] == "count", (status, answer)


def test_content_length_is_parsed_not_pattern_matched():
    """'²'.isdigit() is True and int('²') raises: the body middleware answered a 500 (uvicorn's parsers refuse such a
    header first; an ASGI server in front of the app may not)."""
    import asyncio

    from vpt_lightning.serving.server import RequestBodyMiddleware

    sent: list = []

    async def app(scope, receive, send):
        raise AssertionError("a request with a malformed content-length reached the app")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    for value in ("²", "¹³", "-1", "1e3"):  # header bytes are latin-1: '²' is b"\xb2"
        sent.clear()
        headers = [(b"content-length", value.encode("latin-1"))]
        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""}
        asyncio.run(RequestBodyMiddleware(app, max_bytes=100)(scope, receive, send))
        assert sent[0]["status"] == 400, (value, sent)
        assert "is not a number of bytes" in json.loads(sent[1]["body"])["detail"], (value, sent)


def _through_body_middleware(middleware, method: str, path: str, headers: dict, chunks=(b"",), wait: float = 0):
    """Run one request through ``middleware``: what the app received (None if not called) and what was sent."""
    import asyncio

    reached: dict = {}
    sent: list = []

    async def app(scope, receive, send):
        message = await receive()
        reached.update(headers=dict(scope["headers"]), body=message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    pending = list(chunks)

    async def receive():
        if wait:
            await asyncio.sleep(wait)
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    middleware.app = app
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
    }
    asyncio.run(middleware(scope, receive, send))
    detail = json.loads(sent[1]["body"]).get("detail", "") if sent and sent[0]["status"] != 200 else ""
    return (reached or None), sent[0]["status"], dict(sent[0].get("headers", [])), detail


def test_a_package_upload_goes_through_the_body_cap_the_budget_and_the_read_timeout():
    """PUT /tasks/NAME (a package upload, the store's admin route) is a body like /predict's: its declared length is
    parsed as ASCII digits, capped (--max-package-bytes: 413 unread), held within the budget of bodies held at once
    (503 with Retry-After, unread), read within the read timeout (408); within all of them it reaches the route as
    sent. The route itself read it without these (any size past the budget, no deadline, '²' taken for a digit)."""
    from vpt_lightning.serving.server import RequestBodyMiddleware, buffered_bytes_cap

    def middleware(**limits):  # the app is given by _through_body_middleware
        return RequestBodyMiddleware(None, **{"max_bytes": 100, "max_buffered_bytes": 1000, **limits})

    multipart = {"content-type": "multipart/form-data; boundary=x"}
    body = b"--x\r\n" + b"p" * 400 + b"\r\n--x--\r\n"
    reached, status, _, _ = _through_body_middleware(
        middleware(max_upload_bytes=800), "PUT", "/tasks/x", {**multipart, "content-length": str(len(body))}, [body]
    )
    assert status == 200 and reached["body"] == body, status  # over /predict's 100 bytes, under the upload cap
    assert reached["headers"][b"content-type"] == multipart["content-type"].encode()
    for declared, want, words in (("900", 413, "over 800"), ("²", 400, "not a number of bytes")):
        reached, status, _, detail = _through_body_middleware(
            middleware(max_upload_bytes=800), "PUT", "/tasks/x", {**multipart, "content-length": declared}
        )
        assert (reached, status) == (None, want) and words in detail, (status, detail)
    busy = middleware(max_upload_bytes=800)
    assert busy.budget.take(700)  # bodies being received or answered
    reached, status, headers, detail = _through_body_middleware(
        busy, "PUT", "/tasks/x", {**multipart, "content-length": "400"}, [body]
    )
    assert (reached, status, headers.get(b"retry-after")) == (None, 503, b"1") and "--max-buffered-bytes" in detail
    reached, status, _, detail = _through_body_middleware(
        middleware(max_upload_bytes=800, read_timeout=0.2), "PUT", "/tasks/x", multipart, [body], wait=1
    )
    assert (reached, status) == (None, 408), (status, detail)
    with pytest.raises(ValueError, match="--max-buffered-bytes 1000 is less than --max-package-bytes 5000"):
        buffered_bytes_cap(100, 1000, 5000)
    assert buffered_bytes_cap(100, None, 5000) == 5000  # by default, room for one upload of the largest size
