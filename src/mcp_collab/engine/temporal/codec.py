"""What crosses Temporal, encrypted (MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS): a payload codec on the data
converter of the server and of every worker.

Each payload (a run's job, a step's prompt, output and diff, a heartbeat, a save of the run) is
sealed whole with AES-256-GCM under the first key, a random 96-bit nonce each, and names its key by
an id (a hash's first bytes, which tells nothing of the key): a process decrypts with any key it
has, so a new key can be brought in beside the old one before it encrypts. A payload that is not
encrypted passes as it is (runs started before the keys were set replay unchanged); a process with
keys says so once in its log. A payload this process cannot decrypt fails what needs it for good
(``PayloadKeyError`` is non-retryable: a run's workflow fails, a step fails), saying which key it
needs, since no retry brings the key.

Temporal still sees what is not a payload: run ids, queue and activity names, timings, the
messages of failures (errors the engine raises, which may name a directory: no task, prompt or
output), and its own bookkeeping (the markers of local activities and of ``workflow.patched``,
and the latter's search attribute). mcp-collab sets no memo and no search attribute of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, PayloadCodec
from temporalio.exceptions import ApplicationError

from ...config import PAYLOAD_KEYS_VARIABLE, payload_key_id

log = logging.getLogger("mcp_collab.engine")

ENCODING = b"binary/encrypted"  # the metadata Temporal's own samples (and its UI's codec servers) use
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12  # GCM's own nonce size


class PayloadKeyError(ApplicationError):
    """A payload this process cannot decrypt: a key it lacks, or altered bytes."""

    def __init__(self, message: str) -> None:
        super().__init__(message, non_retryable=True)


class EncryptionCodec(PayloadCodec):
    """Seals payloads with the first of ``keys`` and opens them with any; without keys, passes
    payloads through and refuses encrypted ones with a message that names the setting."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        # One cipher per key, made once: nothing is derived per payload.
        self._ciphers = {payload_key_id(key): AESGCM(key) for key in keys}
        self._sealing = next(iter(self._ciphers.items()), None)
        self._warned = False

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        if self._sealing is None:
            return list(payloads)
        kid, cipher = self._sealing
        sealed = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            data = nonce + cipher.encrypt(nonce, payload.SerializeToString(), None)
            sealed.append(Payload(metadata={"encoding": ENCODING, KEY_ID: kid.encode()}, data=data))
        return sealed

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        opened = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                if self._sealing is not None and not self._warned:
                    self._warned = True
                    log.warning(
                        "a payload came through Temporal unencrypted although %s is set here: a run started "
                        "before the keys were set, or a server or worker without them sent it",
                        PAYLOAD_KEYS_VARIABLE,
                    )
                opened.append(payload)
                continue
            kid = payload.metadata.get(KEY_ID, b"").decode("ascii", "replace")
            cipher = self._ciphers.get(kid)
            if cipher is None:
                ids = ", ".join(self._ciphers)
                have = f"has the key{'s' if len(self._ciphers) > 1 else ''} {ids}" if ids else "has none"
                raise PayloadKeyError(
                    f"a payload is encrypted with key {kid}, and this process {have}: set the same "
                    f"{PAYLOAD_KEYS_VARIABLE} on the server and every worker (the first key encrypts, any decrypts)"
                )
            try:
                data = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], None)
            except InvalidTag:
                raise PayloadKeyError(
                    f"a payload encrypted with key {kid} does not decrypt: it was altered or damaged"
                ) from None
            opened.append(Payload.FromString(data))
        return opened


def data_converter(keys: Sequence[bytes]) -> DataConverter:
    """The pydantic data converter, through the codec (always present: a process without keys then
    says clearly that a payload is encrypted, rather than that its encoding is unknown)."""
    return dataclasses.replace(pydantic_data_converter, payload_codec=EncryptionCodec(keys))
