"""The HTTP management API: devices, service accounts and provisioning over HTTP (docs/api.md).

:func:`create_app` builds the FastAPI app over services its host already runs; :class:`ApiServer`
hosts it with uvicorn in the host's event loop; :class:`StandaloneApi` is ``mqttprov api``.
"""

from broker.http.api.app import PREFIX, create_app
from broker.http.api.context import ApiServices
from broker.http.api.server import ApiServer
from broker.http.api.standalone import StandaloneApi, build_services, run_api

__all__ = ["PREFIX", "ApiServer", "ApiServices", "StandaloneApi", "build_services", "create_app", "run_api"]
