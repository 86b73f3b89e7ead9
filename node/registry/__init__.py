"""Who may speak in a mesh: a local genesis file (default) or a Bittensor metagraph."""

from node.registry.genesis import Genesis, GenesisError, load_genesis, write_genesis

__all__ = ["Genesis", "GenesisError", "load_genesis", "write_genesis"]
