"""scripts/bench's modules: guest (runs in the lab guest), decodebench and table (host side), tools."""
