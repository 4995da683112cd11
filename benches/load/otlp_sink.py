"""A stand-in OpenTelemetry collector for load scripts: accepts OTLP/HTTP
POSTs on /v1/traces, reads them, answers 200 with an empty protobuf, and
counts requests and bytes (written to the file given, at exit). Python's
standard library only; it does not decode the spans (tests/traces.rs
does): the point is the exporter's cost on the proxy, not the collector's.

    otlp_sink.py PORT COUNTS_FILE
"""

import http.server
import signal
import sys

counts = {"requests": 0, "bytes": 0}


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        counts["requests"] += 1
        counts["bytes"] += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    port, out = int(sys.argv[1]), sys.argv[2]

    def stop(*_):
        with open(out, "w") as f:
            f.write("%d requests, %d bytes\n" % (counts["requests"], counts["bytes"]))
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()


if __name__ == "__main__":
    main()
