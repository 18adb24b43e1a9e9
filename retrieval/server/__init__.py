"""`retr serve`: search, recognition and index updates over HTTP, and a web page.

- `settings`: ServerSettings, the options and limits of one service.
- `app`: the FastAPI app factory (`create_app`) and `serve`, which runs it with uvicorn.
- `routes`: thin routes over `service.Service`, which holds the open index and its models.
- `limits`: bounded lanes of work (503 when full, 504 after the timeout), the body size cap.
- `errors`: every error mapped to its status code, in one table.
- `recent`: recent searches, for their match pictures; `models`: typed response bodies.
- `static/`: the page (plain HTML and JavaScript).

FastAPI and uvicorn come with the `serve` extra (`pip install 'retr[serve]'`); importing this
package needs neither (only `app` and what it imports do), so `retr --help` works without them.
"""

from retrieval.server.settings import ServerSettings

__all__ = ["ServerSettings"]
