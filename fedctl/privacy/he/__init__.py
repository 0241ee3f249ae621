"""Homomorphic encryption of model updates (CKKS, through TenSEAL): sites encrypt, the server
adds ciphertexts without any secret key, sites decrypt the aggregate. Transport-free: these
functions take and return tensors and JSON-able descriptions; see docs/he.md.

TenSEAL is optional (``pip install 'fedctl[he]'``) and imported only when a function needs it,
so importing this package is cheap; without it every entry point raises one ``UsageError``.

* :mod:`.params`  CKKS parameters, their checks and bounds; the errors
* :mod:`.context` making, serializing and loading contexts (secret or public)
* :mod:`.blob`    one encrypted tensor as a uint8 tensor; loading ciphertexts safely
* :mod:`.tensors` encrypting and decrypting a model's chosen tensors; their description
* :mod:`.sum`     the server's running sum of encrypted tensors
"""

from fedctl.privacy.he.context import (
    ContextInfo,
    HEContext,
    context_info,
    generate_context,
    load_context,
    public_context,
)
from fedctl.privacy.he.params import MISSING_TENSEAL, HEConfigError, HEError, HEParams
from fedctl.privacy.he.sum import EncryptedSum
from fedctl.privacy.he.tensors import (
    HE_META_KEY,
    Description,
    TensorSpec,
    decrypt_params,
    describe_params,
    encrypt_params,
    parse_description,
    select_keys,
)

__all__ = [
    "HE_META_KEY",
    "MISSING_TENSEAL",
    "ContextInfo",
    "Description",
    "EncryptedSum",
    "HEConfigError",
    "HEContext",
    "HEError",
    "HEParams",
    "TensorSpec",
    "context_info",
    "decrypt_params",
    "describe_params",
    "encrypt_params",
    "generate_context",
    "load_context",
    "parse_description",
    "public_context",
    "select_keys",
]
