#!/usr/bin/env python3
"""The fedstream CDK app: one stack, configured by context (see docs/deploy.md).

npx aws-cdk@2 deploy -c mode=sync -c aggregator=fedavg -c clients=site-a,site-b
"""

from __future__ import annotations

import os
import sys

from aws_cdk import App, Environment
from fedstream.stacks.config import ConfigError
from fedstream.stacks.fedstream_stack import create_stack

from fedstream.registry import PluginError


def main() -> None:
    app = App()
    env = Environment(
        account=os.environ.get("CDK_DEFAULT_ACCOUNT"), region=os.environ.get("CDK_DEFAULT_REGION")
    )
    try:
        create_stack(app, env=env)
    except (ConfigError, PluginError) as exc:
        sys.exit(f"fedstream: {exc}")
    app.synth()


if __name__ == "__main__":
    main()
