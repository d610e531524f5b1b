"""The operator console in the browser (docs/console.md): server-rendered pages beside the API.

:func:`install_console` adds its routes to the API's app (``create_app(..., console=True)``);
:func:`announce_console` logs where it is once the server listens.
"""

from broker.http.console.app import announce_console, install_console

__all__ = ["announce_console", "install_console"]
