"""The terms that protect a party: `encryption` (plain, otp, secagg_plus and their settings), `privacy`, `tls`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedtune.spec.common import Strict, parse_identity


class KeyExchange(Strict):
    """X25519 by default; `curve: ffdhe` is the reference's RFC 7919 group of `key_bitlength` bits.

    Setting `key_bitlength` or `optimized` without `curve` means the finite-field group, as in
    the reference's configuration.
    """

    key_bitlength: Literal[2048, 3072, 4096, 6144, 8192] = 3072
    optimized: bool = True
    curve: Literal["x25519", "ffdhe"] | None = None

    @model_validator(mode="after")
    def _resolve_curve(self) -> KeyExchange:
        if self.curve is None:
            self.curve = "ffdhe" if {"key_bitlength", "optimized"} & self.model_fields_set else "x25519"
        return self


class Csprng(Strict):
    """ChaCha20 by default; `hmac_drbg` (the reference's) when named, or when its `method` is set alone."""

    name: Literal["hmac_drbg", "chacha20"] | None = None
    method: Literal["sha256", "sha512"] = "sha512"

    @model_validator(mode="after")
    def _resolve_name(self) -> Csprng:
        if self.name is None:
            self.name = "hmac_drbg" if "method" in self.model_fields_set else "chacha20"
        return self


class Otp(Strict):
    key_bitlength: Literal[64, 128] = 64
    # c: how many label_trainers may collude with the host. SecAgg+'s threshold must exceed (n + c)/2,
    # and privacy.dp counts on only the other label_trainers' noise.
    max_colluders: int = Field(0, ge=0)
    data_type: Literal["torch.Tensor"] = "torch.Tensor"
    key_exchange: KeyExchange = Field(default_factory=KeyExchange)
    csprng: Csprng = Field(default_factory=Csprng)


class SecAggPlus(Otp):
    """Secure aggregation that survives label_trainers dropping out mid-round (`fedtune.secagg.plus`)."""

    # Shares it takes to remove a round's masks: more than (n + max_colluders)/2 of the n label_trainers
    # (the default is the smallest such number).
    threshold: int | None = Field(None, ge=1)
    # A label_trainer that has not uploaded a round and has given no sign of life for this long since
    # the round's first upload is dropped from it (`aggregation.round_timeout_s` drops every latecomer).
    dropout_timeout_s: float = Field(60.0, gt=0)


SCHEMES = ("plain", "otp", "secagg_plus")


def majority(count: int, colluders: int = 0) -> int:
    """The smallest threshold t > (count + colluders)/2: two groups of honest holders that each reach t with
    the colluders' help must overlap, so no party's two secrets can both be revealed (Bell et al. 2020)."""
    return (count + colluders) // 2 + 1


class Encryption(Strict):
    plain: dict[str, Any] | None = None
    otp: Otp | None = None
    secagg_plus: SecAggPlus | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> Encryption:
        chosen = [name for name in SCHEMES if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError("set exactly one of `plain`, `otp` or `secagg_plus`")
        if not chosen:
            self.plain = {}
        return self

    @property
    def scheme(self) -> Literal["plain", "otp", "secagg_plus"]:
        return next(name for name in SCHEMES if getattr(self, name) is not None)  # type: ignore[return-value]

    @property
    def masking(self) -> Otp | None:
        """The settings of the masking scheme (`otp` or `secagg_plus`), None for `plain`."""
        return self.otp or self.secagg_plus


class Dp(Strict):
    """Differential privacy of the global adapter (`fedtune.privacy`)."""

    # C: each party's update of a round is clipped to this L2 norm (over all its tensors).
    clip_norm: float = Field(gt=0)
    # σ: the aggregate carries Gaussian noise of σ times its sensitivity (σ·C with equal weights).
    noise_multiplier: float = Field(ge=0)
    # ε is reported for this δ.
    delta: float = Field(1e-5, gt=0, lt=1)


class Privacy(Strict):
    dp: Dp | None = None
    # What the host learns of each party's losses (training and valset): `plain` each party's own, `aggregate`
    # only their mean over the parties (masked with the update under otp/secagg_plus), `none` nothing.
    # Under dp the default is `none`: ε accounts for the adapters only.
    losses: Literal["plain", "aggregate", "none"] = "plain"

    @model_validator(mode="after")
    def _no_losses_under_dp(self) -> Privacy:
        if self.dp is not None and "losses" not in self.model_fields_set:
            self.losses = "none"
        return self


class Tls(Strict):
    enabled: bool = True
    # Secrets the user provides instead of the ones fedtune generates (Kubernetes only).
    caSecret: str | None = None
    # Identities (`sha256:<hex>` of a certificate's public key) this party refuses whatever CA signed
    # them: how one organisation revokes a party's key without replacing its CA. Local to each file.
    revoked: list[str] = Field(default_factory=list)

    @field_validator("revoked")
    @classmethod
    def _identities(cls, values: list[str]) -> list[str]:
        return [parse_identity(v) for v in values]
