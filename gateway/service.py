"""`c2cserve gateway`: the OpenAI-compatible HTTP gateway (no torch, no tensors)."""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from gateway.app import create_app
from services import natsutil
from services.config import GatewayConfig, add_config_arguments, load_config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, GatewayConfig)
    parser.add_argument("--tenants", dest="tenants_file", default=None, metavar="FILE",
                        help="same as --tenants-file")


def run(args: argparse.Namespace) -> int:
    config = load_config(GatewayConfig, args)
    app = create_app(config)
    log.info("gateway listening on http://%s:%d", config.host, config.port)
    # handler_cancellation: a client that disconnects cancels its handler -> abort on the worker
    web.run_app(app, host=config.host, port=config.port, print=None, loop=natsutil.new_event_loop(),
                handler_cancellation=True, access_log=None, shutdown_timeout=5)
    return 0
