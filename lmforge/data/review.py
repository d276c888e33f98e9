"""`lmforge review`: a small web page to label garbage candidates; each label retrains the classifier.

The server is the standard library's ThreadingHTTPServer: the page is one static file and
three JSON endpoints, so a web framework would add dependencies and nothing else. It binds
127.0.0.1 by default. Candidates come from ``OUT/garbage.jsonl``, most uncertain first
(score closest to the threshold under the current model). Labels go to ``OUT/labels.json``
and the model to ``OUT/garbage_model.json``, both written atomically; the next
``lmforge ingest`` returns kept paragraphs to the corpus and rescores the rest.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lmforge.data.garbage import GarbageConfig, GarbageModel, score, train
from lmforge.atomic import atomic_write_json
from lmforge.data.io import read_json, read_jsonl

PAGE = Path(__file__).with_name("review.html")
LABELS = ("keep", "discard")


class ReviewStore:
    """Garbage candidates of one output folder, their labels, and the classifier they train."""

    def __init__(self, out: str | Path, config: GarbageConfig = GarbageConfig()):
        self.out, self.config = Path(out), config
        if not (self.out / "garbage.jsonl").exists():
            raise ValueError(f"{self.out / 'garbage.jsonl'} does not exist; run `lmforge ingest ... --out {self.out}` first")
        self.items = {g["id"]: g for g in read_jsonl(self.out / "garbage.jsonl")}
        self.labels: dict[str, dict] = read_json(self.out / "labels.json", default={})
        self.model = GarbageModel.load(self.out / "garbage_model.json")
        self.lock = threading.Lock()

    def ranked(self) -> list[dict]:
        """Candidates with their current score and label, most uncertain first."""
        with self.lock:
            items = list(self.items.values())
            if self.model is None:  # the scores ingest wrote; once labels train a model, its scores
                scores = [(g["score"], g["reasons"]) for g in items]
            else:
                scores = score([g["features"] for g in items], self.model, self.config)
            rows = [{"id": g["id"], "source": Path(g["source"]).name, "page": g["page"], "text": g["text"],
                     "score": round(s, 4), "reasons": [r for r in reasons if not r.startswith("reviewed")],
                     "label": self.labels.get(g["id"], {}).get("label")}
                    for g, (s, reasons) in zip(items, scores)]
        return sorted(rows, key=lambda r: (r["label"] is not None, abs(r["score"] - self.config.threshold)))

    def label(self, item_id: str, label: str) -> dict:
        """Save one label atomically, retrain, and return the label counts."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if item_id not in self.items and item_id not in self.labels:
            raise ValueError(f"unknown item id {item_id!r}; reload the page")
        with self.lock:
            item = self.items.get(item_id) or self.labels[item_id]
            self.labels[item_id] = {"label": label, "source": item["source"], "text": item["text"],
                                    "features": item["features"]}
            atomic_write_json(self.out / "labels.json", self.labels)
            self._retrain()
            return self.counts()

    def _retrain(self) -> None:
        """Fit the classifier on every label so far and save it (once both classes have enough)."""
        rows = list(self.labels.values())
        model = train([r["features"] for r in rows], [r["label"] == "discard" for r in rows])
        if model is not None:
            model.save(self.out / "garbage_model.json")
            self.model = model

    def counts(self) -> dict:
        labels = [v["label"] for v in self.labels.values()]
        return {"keep": labels.count("keep"), "discard": labels.count("discard"),
                "model_labels": self.model.n_labels if self.model else 0}


def _handler(store: ReviewStore) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one store."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # noqa: A002 -- quiet server
            pass

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: object) -> None:
            self._send(status, json.dumps(obj).encode())

        def do_GET(self) -> None:  # noqa: N802
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/api/items":
                self._json(HTTPStatus.OK, {"threshold": store.config.threshold, "items": store.ranked(),
                                           "counts": store.counts()})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/api/label":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._json(HTTPStatus.OK, store.label(str(body.get("id")), str(body.get("label"))))
            except (ValueError, json.JSONDecodeError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

    return Handler


def make_server(out: str | Path, host: str = "127.0.0.1", port: int = 0,
                config: GarbageConfig = GarbageConfig()) -> ThreadingHTTPServer:
    """A review server for `out` (port 0 = a free port; read it from `server.server_port`)."""
    server = ThreadingHTTPServer((host, port), _handler(ReviewStore(out, config)))
    server.daemon_threads = True
    return server


def review_command(out: str, port: int = 8765, host: str = "127.0.0.1", threshold: float = 0.5) -> int:
    """Serve a page to review garbage candidates (keep or discard); labels retrain the classifier.

    Args:
        out: output folder of `lmforge ingest`
        port: port to listen on (0 = any free port)
        host: address to bind; keep 127.0.0.1 unless you mean to share the page
        threshold: garbage threshold used to rank the most uncertain first
    """
    server = make_server(out, host, port, GarbageConfig(threshold=threshold))
    print(f"reviewing {out}: open http://{host}:{server.server_port}/  (Ctrl-C to stop; "
          f"then run `lmforge ingest` again to apply the labels)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
