"""A local S3 server for the object-storage tests: moto's, over HTTP on a
free port of 127.0.0.1, with the AWS environment pointing at it (so
subprocesses reach it too).

moto checks a PUT's If-Match / If-None-Match and then stores the object in
two steps, with no lock between them (moto 5.2.6, s3/responses.py
`put_object`), so two conditional PUTs served by two of its threads at once
could both succeed. S3 does the two atomically, and an OCDBT commit relies
on it; the server here serves one request at a time (each on its own
connection thread), which makes moto's conditional PUT atomic too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator
from unittest import mock
import uuid

try:
  import boto3
  from moto import server as moto_server
  from werkzeug import serving
except ImportError:  # moto[server] is in the `test` extra
  moto_server = None

AVAILABLE = moto_server is not None
MISSING = ("moto[server] is not installed: pip install -e '.[test]' -c "
           "constraints.txt")
REGION = "us-east-1"


class Server:
  """A running moto S3 server; `env` is what points AWS clients at it."""

  def __init__(self):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log
    app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)
    lock = threading.Lock()

    def one_at_a_time(environ, start_response):
      with lock:
        return list(app(environ, start_response))

    self._httpd = serving.make_server("127.0.0.1",
                                      0,
                                      one_at_a_time,
                                      threaded=True,
                                      request_handler=moto_server.MotoRequestHandler)
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()
    self.endpoint = f"http://127.0.0.1:{self._httpd.server_port}"
    self.env = {
        "AWS_ENDPOINT_URL_S3": self.endpoint,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    self.client = boto3.client("s3",
                               endpoint_url=self.endpoint,
                               region_name=REGION,
                               aws_access_key_id="testing",
                               aws_secret_access_key="testing")

  def bucket(self) -> str:
    """A new empty bucket: its s3:// URL."""
    name = f"iat-{uuid.uuid4().hex[:12]}"
    self.client.create_bucket(Bucket=name)
    return f"s3://{name}"

  def objects(self, url: str) -> dict[str, bytes]:
    """Every object under s3://bucket/prefix: key -> its bytes."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    out = {}
    for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix):
      for o in page.get("Contents", []):
        out[o["Key"]] = self.client.get_object(Bucket=bucket,
                                               Key=o["Key"])["Body"].read()
    return out

  def put(self, url: str, key: str, data: bytes) -> None:
    """Overwrites object `key` (a full key) of the bucket of `url`."""
    bucket = url[len("s3://"):].partition("/")[0]
    self.client.put_object(Bucket=bucket, Key=key, Body=data)

  def stop(self) -> None:
    self._httpd.shutdown()
    self._thread.join()
    self._httpd.server_close()


@contextlib.contextmanager
def running() -> Iterator[Server]:
  """A server, and os.environ pointing at it, for the `with` block."""
  server = Server()
  try:
    with mock.patch.dict(os.environ, server.env):
      yield server
  finally:
    server.stop()
