"""Write the schemas the TypeScript client's types are generated from, without a server.

``python dump_schemas.py OUT_DIR`` writes ``openapi.json`` (the API's OpenAPI document, as
``GET /openapi.json`` answers it) and ``protocol.schema.json`` (the JSON Schema of one agent
protocol message, the union the API's ``/v1/messages`` and claim routes carry untyped).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cpa_scheduler import protocol
from cpa_scheduler.api import create_app
from pydantic import TypeAdapter


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # No services: the app builds them on the first request, and openapi() makes none.
    document = create_app().openapi()
    message = TypeAdapter(protocol.Message).json_schema()
    for name, value in (("openapi.json", document), ("protocol.schema.json", message)):
        (out / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: dump_schemas.py OUT_DIR")
    main(Path(sys.argv[1]))
