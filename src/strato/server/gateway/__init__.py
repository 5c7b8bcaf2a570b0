"""The web gateway: routes HTTP requests to web endpoint containers (see ``gateway.py``)."""

from .config import GatewayConfig, load_or_create_web_token, web_token_path
from .gateway import Gateway
from .routes import route_name

__all__ = ["Gateway", "GatewayConfig", "load_or_create_web_token", "route_name", "web_token_path"]
