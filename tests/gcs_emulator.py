"""The tests' Google Cloud Storage server: gcp-storage-emulator (in memory), with what it lacks of GCS's JSON API
and what the toolkit's clients rely on:
- generation preconditions (ifGenerationMatch on uploads, reads and deletes, ifGenerationNotMatch on reads): GCS's
  compare-and-swap, which the run lease and tensorstore's OCDBT manifests use;
- the x-goog-generation header of a media download, from which tensorstore learns what generation it read.
The server handles one request at a time, so a precondition's check and the write it guards are atomic.

    python tests/gcs_emulator.py PORT BUCKET
"""

import json
import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.storage import Storage

_request = {}  # the query of the request being handled


class _PreconditionFailed(Exception):
    pass


def _generation(storage: Storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0  # GCS's ifGenerationMatch=0: "only if the object does not exist"


def _check(storage: Storage, bucket: str, name: str) -> None:
    wanted = _request.get("query", {}).get("ifGenerationMatch")
    if wanted and _generation(storage, bucket, name) != int(wanted[0]):
        raise _PreconditionFailed


def _guarded(method):
    def guarded(self, bucket_name, file_name, *args, **kwargs):
        _check(self, bucket_name, file_name)
        return method(self, bucket_name, file_name, *args, **kwargs)

    return guarded


Storage.create_file = _guarded(Storage.create_file)
Storage.delete_file = _guarded(Storage.delete_file)


def _with_generations(handler, *, download: bool):
    def handle(request, response, storage, *args, **kwargs):
        _request["query"] = request.query
        params = getattr(request, "params", {}) or {}
        bucket, name = params.get("bucket_name"), params.get("object_id")
        try:
            if download and name:
                unwanted = request.query.get("ifGenerationNotMatch")
                if unwanted and _generation(storage, bucket, name) == int(unwanted[0]):
                    response.status = HTTPStatus.NOT_MODIFIED
                    return None
                _check(storage, bucket, name)
            result = handler(request, response, storage, *args, **kwargs)
        except _PreconditionFailed:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "conditionNotMet"}})
            return None
        finally:
            _request.clear()
        if download and name and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = str(_generation(storage, bucket, name))
        return result

    return handle


def _install() -> None:
    from gcp_storage_emulator.handlers import objects

    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if getattr(handler, "__module__", "") == objects.__name__:
                handlers[method] = _with_generations(handler, download=handler in (objects.download, objects.get))


if __name__ == "__main__":
    _install()
    port, bucket = int(sys.argv[1]), sys.argv[2]
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    print(json.dumps({"port": port, "bucket": bucket}), flush=True)
    emulator.run()
