"""The S3-compatible test server: moto's server, with two responses fixed to AWS's wire format.

moto names the XML root of two S3 responses after its own serializer rather than as S3
does, and the Rust SDK (rightly) rejects them:
  CompleteMultipartUpload: S3 answers <CompleteMultipartUploadResult>, moto ...Response
  GetBucketVersioning:     S3 answers <VersioningConfiguration>, moto GetBucketVersioningResponse
Everything else is moto as installed. Usage: s3_server.py -H 127.0.0.1 -p PORT
"""

import argparse
import os
import re

from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

ROOTS = {
    b"CompleteMultipartUploadResponse": b"CompleteMultipartUploadResult",
    b"GetBucketVersioningResponse": b"VersioningConfiguration",
}


def fixed(inner):
    def app(environ, start_response):
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        if not ((method == "GET" and "versioning" in query) or (method == "POST" and "uploadId" in query)):
            return inner(environ, start_response)
        seen = {}

        def capture(status, headers, exc_info=None):
            seen["status"], seen["headers"] = status, headers
            return lambda data: None

        body = b"".join(inner(environ, capture))
        for wrong, right in ROOTS.items():
            body = re.sub(rb"(</?)" + wrong + rb"\b", rb"\1" + right, body)
        headers = [(k, v) for k, v in seen["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(seen["status"], headers)
        return [body]

    return app


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-H", "--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=5000)
    args = p.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    run_simple(args.host, args.port, fixed(DomainDispatcherApplication(create_backend_app)), threaded=True)


if __name__ == "__main__":
    main()
