"""SecAgg+ building blocks (Bell et al. 2020; Bonawitz et al. 2017), shared by device and server.

Owns the cryptographic and arithmetic primitives of secure aggregation, independent of HTTP
and of any round state machine:

* ``shamir``: t-of-n secret sharing of 32-byte seeds over the prime field GF(2**521 - 1);
* ``crypto``: X25519 key pairs, HKDF-SHA256 key agreement, AES-GCM for encrypted shares, and
  the AES-CTR stream that expands a seed into a mask (a cryptographic PRG, unlike a
  ``RandomState`` seeded with 32 bits);
* ``ring``: clipping and unbiased stochastic quantisation of a weighted update into the
  integer ring Z/2**bits, sized so that the sum of every device's vector cannot wrap;
* ``graph``: the sparse random neighbour graph of SecAgg+ (degree about log n);
* ``masking``: a device's masked vector and the server's unmasking of the survivors' sum,
  with the masks of devices that dropped out recovered from their shared secrets;
* ``dgauss`` and ``noise``: distributed DP's exact discrete Gaussian sampler, and a device's
  update encoded at full weight, conditionally rounded and noised before masking;
* ``client``: a device's answer to each stage (:class:`~edge_sdk.secagg.client.SecAggDevice`);
* ``loop``: the device's side over HTTP (:class:`~edge_sdk.secagg.loop.SecAggLoop`), which the
  SDK's client runs instead of an upload for a task whose plan has ``secagg``.

Must not import: ``coordinator``, torch, aiohttp. Needs numpy and ``cryptography``.
"""

from __future__ import annotations

__all__: list[str] = []
