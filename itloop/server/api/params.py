"""Parameter types shared by the routes: ids are bounded to what the database can hold."""

from typing import Annotated

from fastapi import Path, Query

from itloop.protocol.common import MAX_ID

PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
QueryId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
