"""The service's routes: each reads its inputs, calls one Service method, returns its result.

The Service comes from the app's lifespan through `get_service`; index updates depend on
`require_token`; search options are SearchConf fields, validated by it (`search_options`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from features.core import field_help, parse_conf
from index.catalog import Status
from retrieval.search import SearchConf
from retrieval.server.errors import UNAUTHORIZED, Unauthorized
from retrieval.server.limits import token_matches
from retrieval.server.models import (
    AddResponse,
    Health,
    ImageList,
    IndexInfo,
    RecognizeResponse,
    RemoveResponse,
    SearchResponse,
)
from retrieval.server.service import Service, Upload

router = APIRouter()

MAX_ID = 2**63 - 1
"""Catalog ids are SQLite INTEGERs (and FAISS int64 ids): larger ones are 422, never a 500."""
ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="Catalog id of an image.")]


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_token(
    service: ServiceDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Index updates need `Authorization: Bearer TOKEN` when the service has a token."""
    token = service.settings.token
    if token is not None and not token_matches(authorization, token):
        raise Unauthorized(UNAUTHORIZED)


def search_options(
    k: Annotated[int | None, Query(description=field_help(SearchConf, "k"))] = None,
    rerank: Annotated[bool | None, Query(description=field_help(SearchConf, "rerank"))] = None,
    shortlist: Annotated[int | None, Query(description=field_help(SearchConf, "shortlist"))] = None,
    matcher: Annotated[str | None, Query(description=field_help(SearchConf, "matcher"))] = None,
    qe: Annotated[int | None, Query(description=field_help(SearchConf, "qe"))] = None,
    dba: Annotated[int | None, Query(description=field_help(SearchConf, "dba"))] = None,
) -> SearchConf:
    """The options given (the rest keep SearchConf's defaults), checked by SearchConf."""
    given = {
        "k": k,
        "rerank": rerank,
        "shortlist": shortlist,
        "matcher": matcher,
        "qe": qe,
        "dba": dba,
    }
    return parse_conf(
        SearchConf, {name: v for name, v in given.items() if v is not None}, "search options"
    )


SearchOptions = Annotated[SearchConf, Depends(search_options)]
ImageUpload = Annotated[UploadFile, File(description="The query photo.")]


async def read_upload(file: UploadFile) -> Upload:
    return Upload(file.filename or "upload", await file.read())


@router.post("/search", tags=["search"])
async def search(image: ImageUpload, conf: SearchOptions, service: ServiceDep) -> SearchResponse:
    """Rank the indexed images for the uploaded photo and name the landmark it shows (the JSON
    of `retr query --json`, plus the search id for its match pictures)."""
    return await service.search(await read_upload(image), conf)


@router.post("/recognize", tags=["search"])
async def recognize(
    image: ImageUpload, conf: SearchOptions, service: ServiceDep
) -> RecognizeResponse:
    """The landmark the uploaded photo shows: label, confidence and the results that voted."""
    return await service.recognize(await read_upload(image), conf)


@router.get(
    "/matches/{search_id}/{image_id}.png",
    tags=["search"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def match_picture(search_id: str, image_id: ImageId, service: ServiceDep) -> Response:
    """The query of a recent search and an indexed image side by side, with the verified
    correspondences (green) and the rejected matches (red)."""
    picture = await service.match_picture(search_id, image_id)
    counts = {"X-Matches": str(picture.matches), "X-Inliers": str(picture.inliers)}
    return Response(picture.png, media_type="image/png", headers=counts)


@router.get(
    "/images/{image_id}",
    tags=["images"],
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}},
)
def image(
    image_id: ImageId,
    service: ServiceDep,
    size: Annotated[
        int | None, Query(ge=16, le=1024, description="Thumbnail: longer side in px (JPEG).")
    ] = None,
) -> Response:
    """An indexed image, as stored, or a JPEG thumbnail."""
    if size is None:
        return FileResponse(service.image_file(image_id))
    return Response(service.thumbnail(image_id, size), media_type="image/jpeg")


@router.get("/images", tags=["images"])
def list_images(
    service: ServiceDep,
    status: Annotated[Status | None, Query(description="Only rows of this status.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ImageList:
    """Catalog rows by id; failed and duplicate rows carry their reason."""
    return service.list_images(status.value if status else None, offset, limit)


@router.post("/images", tags=["index"], dependencies=[Depends(require_token)])
async def add_images(
    images: Annotated[list[UploadFile], File(description="Photos to index.")],
    service: ServiceDep,
    label: Annotated[str | None, Form(description="Landmark label of every photo.")] = None,
) -> AddResponse:
    """Index uploaded photos (kept under the index's uploads/ folder); needs the token."""
    return await service.add([await read_upload(f) for f in images], label or None)


@router.delete("/images/{image_id}", tags=["index"], dependencies=[Depends(require_token)])
async def remove_image(image_id: ImageId, service: ServiceDep) -> RemoveResponse:
    """Remove an image from the index; needs the token."""
    return await service.remove(image_id)


@router.get("/health", tags=["index"])
def health(service: ServiceDep) -> Health:
    return service.health()


@router.get("/info", tags=["index"])
def info(service: ServiceDep) -> IndexInfo:
    """What `retr index info` shows: configuration, counts by status, sizes."""
    return service.info()
