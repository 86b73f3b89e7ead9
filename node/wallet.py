"""btcli-compatible wallets: ~/.bittensor/wallets/NAME/hotkeys/HOTKEY.

Uses bittensor-wallet itself for the files, so a wallet made by btcli loads here
unchanged and one made here works with btcli.
"""

from __future__ import annotations

from pathlib import Path

from bittensor_wallet import Wallet

from crypto.identity import Hotkey

DEFAULT_WALLET_PATH = Path("~/.bittensor/wallets")


class WalletError(Exception):
    """A wallet or hotkey that cannot be created or loaded; the message says what to do."""


def hotkey_path(name: str, hotkey: str, path: Path = DEFAULT_WALLET_PATH) -> Path:
    return Path(path).expanduser() / name / "hotkeys" / hotkey


def create_hotkey(name: str, hotkey: str, path: Path = DEFAULT_WALLET_PATH, *,
                  overwrite: bool = False) -> Hotkey:
    """Write a new unencrypted sr25519 hotkey in btcli's layout and return it."""
    target = hotkey_path(name, hotkey, path)
    if target.exists() and not overwrite:
        raise WalletError(f"hotkey already exists at {target}; pass --overwrite to replace it "
                          "(its old key is then lost)")
    wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(path).expanduser()))
    wallet.create_new_hotkey(n_words=12, use_password=False, overwrite=overwrite, suppress=True)
    return Hotkey(wallet.hotkey)


def load_hotkey(name: str, hotkey: str, path: Path = DEFAULT_WALLET_PATH) -> Hotkey:
    target = hotkey_path(name, hotkey, path)
    if not target.exists():
        raise WalletError(f"no hotkey at {target}; create one with "
                          f"`sealmesh wallet create --name {name} --hotkey {hotkey}` or btcli")
    try:
        wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(path).expanduser()))
        return Hotkey(wallet.hotkey)
    except Exception as exc:  # bittensor-wallet raises its own KeyFileError family
        raise WalletError(f"cannot load hotkey {target}: {exc} (an encrypted hotkey must be "
                          "unlocked with btcli first)") from exc
