"""The HTTP routes, one module per endpoint family, each an APIRouter that ``app`` includes. A route
finds its serving object on ``request.app.state.axiscap`` (the ``ServerState``)."""
