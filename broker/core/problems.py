"""Every problem code the broker puts in a state document (SPEC section 3), as one enum.

A ``StrEnum`` member is equal to its text, so ``problem.code == "file-missing"`` and a
state document read back from JSON keep working; new code names the member instead.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MISSING_CODES", "REJECTING_CODES", "ProblemCode"]


class ProblemCode(StrEnum):
    """A problem's ``code``: what is wrong, as consumers and remedies key on it."""

    # -- the files are not there (the credential is missing) ---------------------------------
    FILE_MISSING = "file-missing"
    FILE_UNREADABLE = "file-unreadable"
    SYMLINK_LOOP = "symlink-loop"
    SECTION_MISSING = "section-missing"
    # -- the files are there but wrong (the credential is invalid) ---------------------------
    NOT_A_FILE = "not-a-file"
    TOO_LARGE = "too-large"
    EMPTY = "empty"
    BINARY_CONTENT = "binary-content"
    MALFORMED_JWT = "malformed-jwt"
    MALFORMED_JSON = "malformed-json"
    NOT_A_JSON_OBJECT = "not-a-json-object"
    MALFORMED_INI = "malformed-ini"
    MALFORMED_PEM = "malformed-pem"
    MALFORMED_KEY = "malformed-key"
    NO_CERTIFICATE = "no-certificate"
    KEY_MISMATCH = "key-mismatch"
    NO_EXPIRY = "no-expiry"
    BAD_EXPIRY = "bad-expiry"
    EXPIRY_OUT_OF_RANGE = "expiry-out-of-range"
    INSECURE_PERMISSIONS = "insecure-permissions"
    # -- the lifetime ------------------------------------------------------------------------
    EXPIRING = "expiring"
    EXPIRED = "expired"
    # -- what the engine says about how it sees the files ------------------------------------
    SETTLING = "settling"
    WRITER_ACTIVE = "writer-active"
    WATCH_POLLING = "watch-polling"
    NOISY_DIRECTORY = "noisy-directory"
    # -- findings from outside the files (validator, refresh runner, actions) -----------------
    REJECTED_BY_VALIDATOR = "rejected-by-validator"
    VALIDATOR_UNREACHABLE = "validator-unreachable"
    VALIDATOR_UNEXPECTED_STATUS = "validator-unexpected-status"
    REFRESH_FAILED = "refresh-failed"
    ACTION_FAILED = "action-failed"


#: A file that cannot be opened makes the credential missing; one that opens but is wrong,
#: invalid. A selector naming a section the file lacks is "missing" too: the credential is
#: not there.
MISSING_CODES = frozenset({
    ProblemCode.FILE_MISSING,
    ProblemCode.FILE_UNREADABLE,
    ProblemCode.SYMLINK_LOOP,
    ProblemCode.SECTION_MISSING,
})
#: Findings from outside the files (a validator) that make unchanged content invalid.
REJECTING_CODES = frozenset({ProblemCode.REJECTED_BY_VALIDATOR})
