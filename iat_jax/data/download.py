"""Fetches a zip or tar archive over HTTP(S) and unpacks it atomically.

Used by `python -m iat_jax.data.movielens --download=...` and
`python -m iat_jax.data.kuairand --download`. The archive is
downloaded and extracted inside a temporary sibling of the target directory;
the folder that holds the marker file is then renamed to the target, so the
target either does not exist or holds the complete files.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile

from absl import logging

from iat_jax import errors


def _by_hand(url: str, data_dir: str, marker: str) -> str:
  name = os.path.basename(url)
  if name.endswith(".zip"):
    unpack, folder = f"unzip {name}", name[:-len(".zip")]
  else:
    unpack, folder = f"tar -xzf {name}", name.split(".tar")[0]
  return (f"Fetch {url} by hand (on a machine with internet access), copy it "
          f"here and unpack it so that {os.path.join(data_dir, marker)} exists, "
          f"e.g. `{unpack} && mv {folder} {data_dir}` (the folder that holds "
          f"{marker}).")


def download(url: str, data_dir: str, marker: str, timeout: float = 60.0) -> str:
  """Downloads the archive at `url` and unpacks it as `data_dir`.

  Args:
    url: address of a zip or tar (optionally compressed) archive.
    data_dir: directory to create; it receives the contents of the archive's
      folder that holds `marker` (e.g. ml-100k/ of ml-100k.zip).
    marker: name of a file the archive must contain, e.g. "u.data". If
      `data_dir` already holds it, nothing is downloaded.
    timeout: seconds to wait for the server.

  Returns:
    data_dir.

  Raises:
    errors.DownloadError: no network, a server error, a bad archive, or a non-empty
      `data_dir` without `marker`. Nothing is left behind.
  """
  data_dir = os.path.abspath(data_dir)
  if os.path.isfile(os.path.join(data_dir, marker)):
    logging.info("%s already holds %s; not downloading", data_dir, marker)
    return data_dir
  if os.path.isdir(data_dir) and os.listdir(data_dir):
    raise errors.DownloadError(f"{data_dir} is not empty but holds no {marker}; give "
                               f"an empty or new --data_dir")
  parent = os.path.dirname(data_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(data_dir) + ".download-", dir=parent)
  try:
    archive = os.path.join(tmp, os.path.basename(url) or "archive.zip")
    _fetch(url, archive, timeout, data_dir, marker)
    unpacked = os.path.join(tmp, "unpacked")
    _unpack(url, archive, unpacked)
    src = next(
        (root for root, _, files in sorted(os.walk(unpacked)) if marker in files), None)
    if src is None:
      raise errors.DownloadError(f"{url} holds no {marker}")
    if os.path.isdir(data_dir):
      os.rmdir(data_dir)  # empty, checked above
    os.rename(src, data_dir)
    logging.info("unpacked %s into %s", url, data_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return data_dir


def _fetch(url: str, archive: str, timeout: float, data_dir: str, marker: str) -> None:
  """Downloads `url` into the file `archive`; DownloadError saying how to
  fetch it by hand when the server or the network fails."""
  logging.info("downloading %s", url)
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r, open(archive, "wb") as f:
      shutil.copyfileobj(r, f)
  except urllib.error.HTTPError as e:
    raise errors.DownloadError(f"cannot download {url}: the server answered HTTP "
                               f"{e.code} {e.reason}. " +
                               _by_hand(url, data_dir, marker)) from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise errors.DownloadError(f"cannot download {url}: the network is unreachable "
                               f"({reason}). " +
                               _by_hand(url, data_dir, marker)) from None


def _unpack(url: str, archive: str, unpacked: str) -> None:
  """Unpacks the zip or tar `archive` (from `url`) into the directory `unpacked`,
  keeping every member inside it."""
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as z:
        z.extractall(unpacked)  # zipfile drops absolute and ".." components
    else:
      with tarfile.open(archive) as t:
        t.extractall(unpacked, filter="data")  # no links out, no ".."
  except (zipfile.BadZipFile, tarfile.TarError) as e:
    raise errors.DownloadError(
        f"{url} is not a valid zip or tar archive ({e})") from None
