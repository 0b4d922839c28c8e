"""``python -m device_agent run ...``: the agent's slim command line (device_agent.main)."""

from device_agent.main import console_main

raise SystemExit(console_main())
