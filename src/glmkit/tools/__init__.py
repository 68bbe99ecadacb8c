"""Tools the model can call: the contract (base.py), MCP servers (mcp_client.py)."""
