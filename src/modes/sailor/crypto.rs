//! Sailor's message cipher (`lib/encryptor.js`): AES-256-CBC with PKCS#7 padding, the key being
//! SHA-256 of the password and the IV the raw bytes of `ELASTICIO_MESSAGE_CRYPTO_IV`.
//!
//! The same IV serves every message; that is the platform's wire contract, not a choice made
//! here, and other steps of the flow (Node.js or JVM) must be able to read what we publish.

use aes::cipher::{block_padding::Pkcs7, BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine as _};
use sha2::{Digest, Sha256};
use std::fmt;

use crate::secret::Secret;

type Encryptor = cbc::Encryptor<aes::Aes256>;
type Decryptor = cbc::Decryptor<aes::Aes256>;

/// Node's `Buffer.from(s, 'base64')` shrugs off missing padding and stray trailing bits, so a
/// peer may legally send either; encoding still uses canonical padded `STANDARD`.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Why a message body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("Failed to decrypt message: the body is not valid base64")]
    BadBase64,
    /// Wrong password or IV, a corrupted body, or a length that is not a whole number of blocks.
    #[error("Failed to decrypt message: bad ciphertext (wrong key, bad padding or truncated)")]
    BadCiphertext,
}

/// Encrypts and decrypts message bodies. `None` key = the password is empty, so bodies travel
/// as plain JSON, as sailor allows.
#[derive(Clone)]
pub struct Cipher {
    key: Option<([u8; 32], [u8; 16])>,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.key.is_some() {
            "aes-256-cbc"
        } else {
            "plain"
        };
        f.debug_struct("Cipher")
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

impl Cipher {
    /// Derives the key from `password`. With a non-empty password the IV must be exactly 16 bytes
    /// (checked here, once, rather than failing on every message as Node would); with an empty
    /// password the IV is ignored.
    pub fn new(password: &Secret, iv: &str) -> Result<Cipher, String> {
        if password.expose().is_empty() {
            return Ok(Cipher { key: None });
        }
        let iv: [u8; 16] = iv.as_bytes().try_into().map_err(|_| {
            format!(
                "ELASTICIO_MESSAGE_CRYPTO_IV must be exactly 16 bytes, it has {}",
                iv.len()
            )
        })?;
        let key: [u8; 32] = Sha256::digest(password.expose().as_bytes()).into();
        Ok(Cipher {
            key: Some((key, iv)),
        })
    }

    /// Raw ciphertext of `plaintext` (or `plaintext` itself without a password).
    pub fn encrypt(&self, plaintext: &[u8]) -> Vec<u8> {
        match &self.key {
            None => plaintext.to_vec(),
            Some((key, iv)) => {
                Encryptor::new(key.into(), iv.into()).encrypt_padded_vec::<Pkcs7>(plaintext)
            }
        }
    }

    /// Inverse of [`Cipher::encrypt`].
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match &self.key {
            None => Ok(ciphertext.to_vec()),
            Some((key, iv)) => Decryptor::new(key.into(), iv.into())
                .decrypt_padded_vec::<Pkcs7>(ciphertext)
                .map_err(|_| CryptoError::BadCiphertext),
        }
    }

    /// Wire form of a message body for a protocol version: below 2 the ASCII base64 of the
    /// ciphertext, from 2 on the raw ciphertext. Sailor base64-wraps even without a password,
    /// so this does too.
    pub fn encode(&self, plaintext: &[u8], protocol_version: u8) -> Vec<u8> {
        let ciphertext = self.encrypt(plaintext);
        if protocol_version < 2 {
            STANDARD.encode(ciphertext).into_bytes()
        } else {
            ciphertext
        }
    }

    /// Inverse of [`Cipher::encode`]; `protocol_version` comes from the incoming message's header
    /// (1 when absent). Whitespace around or inside base64 (line wrapping) is ignored, as Node
    /// ignores it.
    pub fn decode(&self, content: &[u8], protocol_version: u8) -> Result<Vec<u8>, CryptoError> {
        if protocol_version >= 2 {
            return self.decrypt(content);
        }
        let compact: Vec<u8> = content
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let ciphertext = LENIENT_BASE64
            .decode(compact)
            .map_err(|_| CryptoError::BadBase64)?;
        self.decrypt(&ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_PLAIN: &[u8] = br#"{"property1":"Hello world"}"#;
    const VECTOR_BASE64: &str = "Tr4yMVgk/jAY3bMwHIA5g4FpYR72SnQxIwf+BG4ZmjQ=";

    fn cipher() -> Cipher {
        Cipher::new(&Secret::new("testCryptoPassword"), "iv=any16_symbols").unwrap()
    }

    #[test]
    fn matches_the_published_vector() {
        let c = cipher();
        assert_eq!(c.encode(VECTOR_PLAIN, 1), VECTOR_BASE64.as_bytes());
        assert_eq!(c.decode(VECTOR_BASE64.as_bytes(), 1).unwrap(), VECTOR_PLAIN);
        let raw = STANDARD.decode(VECTOR_BASE64).unwrap();
        assert_eq!(c.encode(VECTOR_PLAIN, 2), raw);
        assert_eq!(c.decode(&raw, 2).unwrap(), VECTOR_PLAIN);
    }

    #[test]
    fn round_trips_every_protocol_version() {
        let c = cipher();
        let texts: [&[u8]; 3] = [
            "\"B2B_L größere Firmenkunden 25% Rabatt\"".as_bytes(),
            b"",
            &[b'x'; 16],
        ];
        for text in texts {
            for version in [0, 1, 2, 3] {
                let wire = c.encode(text, version);
                assert_eq!(c.decode(&wire, version).unwrap(), text, "v{version}");
            }
            assert_eq!(
                c.encrypt(text).len(),
                (text.len() / 16 + 1) * 16,
                "PKCS#7 pads"
            );
        }
    }

    #[test]
    fn base64_tolerates_whitespace_and_missing_padding() {
        let c = cipher();
        let wrapped = format!("  \n{}\r\n{}\n", &VECTOR_BASE64[..20], &VECTOR_BASE64[20..]);
        assert_eq!(c.decode(wrapped.as_bytes(), 1).unwrap(), VECTOR_PLAIN);
        let unpadded = VECTOR_BASE64.trim_end_matches('=');
        assert_eq!(c.decode(unpadded.as_bytes(), 1).unwrap(), VECTOR_PLAIN);
    }

    #[test]
    fn wrong_password_or_mangled_body_is_an_error() {
        let other = Cipher::new(&Secret::new("another password"), "iv=any16_symbols").unwrap();
        match other.decode(VECTOR_BASE64.as_bytes(), 1) {
            Err(CryptoError::BadCiphertext) => {}
            Ok(garbage) => assert_ne!(garbage, VECTOR_PLAIN),
            Err(e) => panic!("unexpected {e:?}"),
        }
        let raw = STANDARD.decode(VECTOR_BASE64).unwrap();
        assert!(matches!(
            cipher().decrypt(&raw[..31]),
            Err(CryptoError::BadCiphertext)
        ));
        assert!(matches!(
            cipher().decrypt(b""),
            Err(CryptoError::BadCiphertext)
        ));
        // sailor's own "should throw error if failed to decrypt" input, passed raw as there
        assert!(matches!(
            cipher().decode(b"dsdasdsad", 2),
            Err(CryptoError::BadCiphertext)
        ));
    }

    #[test]
    fn bad_base64_is_its_own_error() {
        let err = cipher().decode(b"not base64 at all!", 1).unwrap_err();
        assert!(matches!(err, CryptoError::BadBase64));
        assert!(err.to_string().starts_with("Failed to decrypt message"));
    }

    #[test]
    fn iv_must_be_sixteen_bytes() {
        for iv in ["", "short", "initiailization vector", "sixteen bytes éé"] {
            let err = Cipher::new(&Secret::new("pw"), iv).unwrap_err();
            assert!(err.contains("ELASTICIO_MESSAGE_CRYPTO_IV"), "{err}");
        }
    }

    #[test]
    fn empty_password_passes_plain_json_through() {
        let c = Cipher::new(&Secret::new(""), "").unwrap();
        assert_eq!(c.encrypt(VECTOR_PLAIN), VECTOR_PLAIN);
        assert_eq!(c.decrypt(VECTOR_PLAIN).unwrap(), VECTOR_PLAIN);
        assert_eq!(c.encode(VECTOR_PLAIN, 2), VECTOR_PLAIN);
        let v1 = c.encode(VECTOR_PLAIN, 1);
        assert_eq!(v1, STANDARD.encode(VECTOR_PLAIN).as_bytes());
        assert_eq!(c.decode(&v1, 1).unwrap(), VECTOR_PLAIN);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let debug = format!("{:?}", cipher());
        assert_eq!(debug, "Cipher { mode: \"aes-256-cbc\", .. }");
    }
}
