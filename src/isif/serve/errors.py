"""How every error of ``isif serve`` is answered: JSON ``{"error": "..."}`` with its status, never a traceback
page; from a route (``RequestError``, FastAPI's own errors) or from the middleware in front of the app."""

import json


class RequestError(Exception):
    """A bad request: answered as JSON {"error": message} with ``status`` (and ``headers``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def json_asgi(send, status: int, message: str) -> None:
    """The JSON error answer, sent by an ASGI middleware itself."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def json_errors(app) -> None:
    """Answer every error of ``app`` as JSON: a RequestError with its status, a missing page, an invalid
    parameter, and anything else as a 500 without its traceback."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = "no such page: the API is under /api (see the README)" if e.status_code == 404 else str(e.detail)
        return error(e.status_code, msg)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):  # logged by uvicorn; the client gets no traceback
        return error(500, f"internal error ({type(e).__name__}); see the server's log")
