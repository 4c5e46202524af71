"""gcp-storage-emulator with GCS's generation semantics, for tensorstore's gcs driver.

    python tests/gcs_emulator.py PORT   (in memory, bucket "bucket", 127.0.0.1 only)

The emulator (2026.7.19) sends no `x-goog-generation` header with object data and ignores
the `ifGenerationMatch` / `ifGenerationNotMatch` preconditions. tensorstore reads an
object's generation from that header (a missing one parses as 0), and OCDBT re-reads its
manifest with `GET .../manifest.ocdbt?alt=media&ifGenerationNotMatch=<gen of its last write>`
before each further commit: the 200 answer without the header stamps the cached manifest
with generation 0, which is not a valid GCS generation, so the next conditional read or
write fails with "Malformed StorageGeneration". A save needs a second commit once it has
more than a few dozen arrays, hence the failure at ~40. Real GCS sends the header and
honours the preconditions (304 / 412); this wrapper adds both and changes nothing else.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _query(request, key):
    values = request.query.get(key)
    return values[0] if values else None


def _object(storage, bucket, name):
    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def _reject(response, status):
    response.status = status
    if status == HTTPStatus.PRECONDITION_FAILED:
        response.json({"error": {"code": 412, "message": "Precondition Failed"}})


def _read(handler):
    """GET (data or metadata) and DELETE: 412 / 304 on a failed precondition, and the
    generation headers on the data."""
    def wrapped(request, response, storage, *args, **kwargs):
        obj = _object(storage, request.params["bucket_name"], request.params["object_id"])
        if obj is not None:  # a missing object is the handler's 404
            gen = str(obj["generation"])
            match, not_match = _query(request, "ifGenerationMatch"), _query(
                request, "ifGenerationNotMatch")
            if match is not None and match != gen:
                return _reject(response, HTTPStatus.PRECONDITION_FAILED)
            if not_match is not None and not_match == gen:
                return _reject(response, HTTPStatus.NOT_MODIFIED)
        handler(request, response, storage, *args, **kwargs)
        if obj is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
    return wrapped


def _write(handler):
    """Uploads: `ifGenerationMatch=0` means "only if absent", N "only over generation N"."""
    def wrapped(request, response, storage, *args, **kwargs):
        match, name = _query(request, "ifGenerationMatch"), _query(request, "name")
        if match is not None and name is not None:
            obj = _object(storage, request.params["bucket_name"], name)
            if match != (str(obj["generation"]) if obj is not None else "0"):
                return _reject(response, HTTPStatus.PRECONDITION_FAILED)
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


def patch():
    wrappers = {objects.get: _read, objects.download: _read, objects.delete: _read,
                objects.insert: _write}
    for _, handlers in server.HANDLERS:  # the routing table holds the functions themselves
        for method, fn in list(handlers.items()):
            if fn in wrappers:
                handlers[method] = wrappers[fn](fn)


if __name__ == "__main__":
    patch()
    server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True,
                         default_bucket="bucket").run()
