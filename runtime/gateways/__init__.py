"""The gateways: `item serve` (server, batcher) and `item watch`."""
