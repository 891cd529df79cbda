#![forbid(unsafe_code)]
//! The Isthmus mesh certificate authority: CA material ([`Ca`]), join tokens
//! ([`TokenIssuer`], [`TokenLedger`]), the Istio-compatible certificate API
//! ([`CertificateService`]) and the TLS setup of port 15012 ([`server_tls_config`]).
//!
//! Root rotation is described in `ROTATION.md` beside this crate.

pub mod authority;
pub mod cert;
pub mod csr;
pub mod files;
pub mod pin;
pub mod service;
pub mod spiffe;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tls;
pub mod token;

/// Generated from `proto/istio/v1/auth/ca.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("istio.v1.auth");
}

/// Generated from `proto/isthmus/onboarding/v1/onboarding.proto` (served by the control plane).
pub mod onboarding_pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("isthmus.onboarding.v1");
}

pub use authority::{
    Ca, CaConfig, CaError, IssuedKeyPair, ServingCertOptions, SignError, SignRequest,
};
pub use cert::{CertError, CertInfo, ChainVerifier};
pub use csr::{parse_csr, parse_csr_der, CsrError, ParsedCsr};
pub use pin::{parse_root_hash, root_hash, PinError};
pub use service::{
    bearer_token, AuthError, Authenticator, CaMetrics, Caller, CertificateService, Credential,
};
pub use spiffe::{SpiffeError, SpiffeId};
pub use tls::{
    default_guard, server_tls_config, tls_incoming, tls_incoming_guarded, GuardedTls, TlsError,
};
pub use token::{
    claims_unverified, token_identity_unverified, LedgerError, MemoryLedger, TokenClaims,
    TokenError, TokenIssuer, TokenLedger, TokenRecord, WORKLOAD_KIND, WORKLOAD_TTL_RANGE,
};

/// Decodes an `IstioCertificateRequest` from its protobuf bytes (fuzzing entry point).
pub fn decode_request(bytes: &[u8]) -> Result<pb::IstioCertificateRequest, prost::DecodeError> {
    prost::Message::decode(bytes)
}

/// Formats a duration compactly for messages: `90d`, `1d12h`, `11h59m58s`, `0s`.
pub fn format_duration(d: std::time::Duration) -> String {
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn formats_durations() {
        assert_eq!(
            super::format_duration(Duration::from_secs(90 * 86_400)),
            "90d"
        );
        assert_eq!(
            super::format_duration(Duration::from_secs(43_198)),
            "11h59m58s"
        );
        assert_eq!(super::format_duration(Duration::from_millis(300)), "0s");
    }
}
