//! Parsing the store's JSON replies. A secret's field is taken straight
//! from the zeroizing body into a zeroizing string: the body is walked
//! with borrowed raw values and only the wanted field is copied. No
//! parser error text is ever passed on, since serde's messages can quote
//! the value they choked on.

use std::collections::BTreeMap;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

/// What `GET /v1/<mount>/metadata/<path>` says about a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub current_version: u64,
    pub current: VersionState,
}

/// The current version as the metadata describes it. A `deletion_time`
/// is the store's clock, not ours: it is set in the past by a soft
/// delete, in the future by `delete_version_after` at every write, and
/// comparing it with the host's clock would let a host clock that is
/// behind keep a deleted secret in the guests, or one that is ahead
/// remove a live one. So a version with a deletion time is read, and
/// the data read's answer decides (the value, or OpenBao's "deleted"
/// 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// No deletion time, not destroyed.
    Live,
    /// A deletion time, past or future: the data read decides.
    DeletionTimeSet,
    /// Destroyed: no data, whatever the time.
    Destroyed,
}

#[derive(Deserialize)]
struct MetaReply {
    data: MetaData,
}

#[derive(Deserialize)]
struct MetaData {
    current_version: u64,
    #[serde(default)]
    versions: BTreeMap<String, VersionMeta>,
}

#[derive(Deserialize)]
struct VersionMeta {
    #[serde(default)]
    deletion_time: String,
    #[serde(default)]
    destroyed: bool,
}

pub fn metadata(body: &[u8]) -> Result<Metadata, String> {
    let r: MetaReply = serde_json::from_slice(body)
        .map_err(|_| "the metadata reply is not KV v2 metadata (is the mount KV version 2?)")?;
    let current = match r.data.versions.get(&r.data.current_version.to_string()) {
        Some(v) if v.destroyed => VersionState::Destroyed,
        Some(v) if !v.deletion_time.is_empty() => VersionState::DeletionTimeSet,
        _ => VersionState::Live,
    };
    Ok(Metadata {
        current_version: r.data.current_version,
        current,
    })
}

#[derive(Deserialize)]
struct DataReply<'a> {
    #[serde(borrow)]
    data: Option<DataOuter<'a>>,
}

#[derive(Deserialize)]
struct DataOuter<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Why a field could not be taken from a data reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldError {
    /// The reply is not KV v2 data.
    Malformed,
    /// The version holds no data (deleted or destroyed).
    NoData,
    Missing,
    NotAString,
}

/// Checks that a data reply holds a secret (an object of fields).
pub fn check_data(body: &[u8]) -> Result<(), FieldError> {
    let r: DataReply = serde_json::from_slice(body).map_err(|_| FieldError::Malformed)?;
    let raw = r.data.and_then(|d| d.data).ok_or(FieldError::NoData)?;
    if raw.get().trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(FieldError::NoData)
    }
}

/// The string value of `field` in a data reply.
pub fn field(body: &[u8], field: &str) -> Result<Zeroizing<String>, FieldError> {
    let r: DataReply = serde_json::from_slice(body).map_err(|_| FieldError::Malformed)?;
    let raw = r.data.and_then(|d| d.data).ok_or(FieldError::NoData)?;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match (Pick { field }).deserialize(&mut de) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(FieldError::Missing),
        Err(e) if e.is_data() => Err(FieldError::NotAString),
        Err(_) => Err(FieldError::NoData),
    }
}

struct Pick<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Option<Zeroizing<String>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Option<Zeroizing<String>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object of fields")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        // Keys are field names, not secrets.
        while let Some(k) = m.next_key::<String>()? {
            if k == self.field && found.is_none() {
                found = Some(m.next_value::<ZString>()?.0);
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// A JSON string read into a zeroizing buffer. The raw JSON text is
/// borrowed from the (zeroizing) reply and decoded here, straight into a
/// buffer sized to it: serde_json would decode a string with escapes into
/// its scratch `Vec` first, which grows and is freed without wiping.
/// Needs a deserializer that lends raw values (serde_json on a slice or
/// `str`), which every reply here is parsed with.
struct ZString(Zeroizing<String>);

impl<'de> Deserialize<'de> for ZString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        unescape(raw.get()).map(ZString).ok_or_else(|| {
            serde::de::Error::invalid_type(
                serde::de::Unexpected::Other("not a string"),
                &"a string",
            )
        })
    }
}

/// The text of a JSON string literal (quotes included), its escapes
/// decoded; `None` when `raw` is not a string or holds a lone surrogate.
/// Decoded text is never longer than its escaped form, so the buffer
/// reserved up front never moves.
fn unescape(raw: &str) -> Option<Zeroizing<String>> {
    let inner = raw.trim().strip_prefix('"')?.strip_suffix('"')?;
    let mut out = Zeroizing::new(String::with_capacity(inner.len()));
    let mut rest = inner;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i + 1..i + 2)?;
        rest = &rest[i + 2..];
        let c = match esc {
            "\"" => '"',
            "\\" => '\\',
            "/" => '/',
            "b" => '\u{8}',
            "f" => '\u{c}',
            "n" => '\n',
            "r" => '\r',
            "t" => '\t',
            "u" => {
                let hi = hex4(rest)?;
                rest = &rest[4..];
                match hi {
                    0xD800..=0xDBFF => {
                        let lo = hex4(rest.strip_prefix("\\u")?)?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return None;
                        }
                        rest = &rest[6..];
                        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => char::from_u32(hi)?,
                }
            }
            _ => return None,
        };
        out.push(c);
    }
    out.push_str(rest);
    Some(out)
}

/// The four hex digits at the start of `s`.
fn hex4(s: &str) -> Option<u32> {
    let h = s.get(..4)?;
    if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(h, 16).ok()
}

/// What a 404 reply says, judged by its body: only OpenBao's own shapes
/// mean "deleted". A reverse proxy or load balancer in front of the store
/// answering 404 (an HTML page, an empty body, a route missing during a
/// deploy) must not make a credential leave its guests.
///
/// Seen from `bao server -dev` 2.x (2026-12-01): a never-written or
/// metadata-deleted secret, or a version that does not exist, answers
/// `{"errors":[]}` (metadata and data alike); a soft-deleted or destroyed
/// version's data answers the KV v2 data reply with `data.data: null` and
/// `data.metadata.deletion_time` set or `destroyed: true`; a mount that
/// does not exist answers `{"errors":["no handler for route ..."]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotFound {
    /// `{"errors":[]}`: no such secret, or no such version.
    Absent,
    /// The data reply of a version that is soft-deleted or destroyed.
    VersionGone,
    /// OpenBao's error list with entries (a missing mount or route): the
    /// store's error, not a deleted secret. The text is bounded and
    /// escaped, as [`errors`] makes it.
    Error(String),
    /// Not OpenBao's reply (not a JSON object of its shape); what it was,
    /// for the status line (never the body itself).
    Foreign(&'static str),
}

pub fn not_found(body: &[u8]) -> NotFound {
    #[derive(Deserialize)]
    struct Reply<'a> {
        errors: Option<Vec<String>>,
        #[serde(borrow)]
        data: Option<GoneData<'a>>,
    }
    #[derive(Deserialize)]
    struct GoneData<'a> {
        #[serde(borrow)]
        data: Option<&'a RawValue>,
        metadata: Option<VersionMeta>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return NotFound::Foreign("an empty body");
    }
    let Ok(r) = serde_json::from_slice::<Reply>(body) else {
        return NotFound::Foreign("a body that is not a JSON object");
    };
    match (r.errors, r.data) {
        (Some(e), None) if e.is_empty() => NotFound::Absent,
        (Some(_), None) => NotFound::Error(errors(body)),
        (None, Some(d)) => {
            let no_data = d.data.map(|v| v.get().trim() == "null").unwrap_or(true);
            match d.metadata {
                Some(m) if no_data && (!m.deletion_time.is_empty() || m.destroyed) => {
                    NotFound::VersionGone
                }
                _ => NotFound::Foreign("JSON that is neither an error list nor a deleted version"),
            }
        }
        _ => NotFound::Foreign("JSON that is neither an error list nor a deleted version"),
    }
}

/// The `auth` part of a login or renewal reply, and `data` of lookup-self.
#[derive(Deserialize)]
pub struct AuthReply {
    pub auth: Option<AuthInfo>,
}

#[derive(Deserialize)]
pub struct AuthInfo {
    #[serde(default)]
    pub client_token: Option<ZToken>,
    #[serde(default)]
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
    /// The token's policies; without `default` the token may not look
    /// itself up or renew itself.
    #[serde(default)]
    pub token_policies: Vec<String>,
}

/// A token from a login reply, zeroized on drop.
pub struct ZToken(pub Zeroizing<String>);

impl<'de> Deserialize<'de> for ZToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ZString::deserialize(d).map(|z| ZToken(z.0))
    }
}

#[derive(Deserialize)]
pub struct LookupReply {
    pub data: LookupData,
}

#[derive(Deserialize)]
pub struct LookupData {
    #[serde(default)]
    pub ttl: u64,
    #[serde(default)]
    pub renewable: bool,
}

/// The `errors` list of an error reply, for a status line. Store error
/// texts name paths and policies, never secret values.
pub fn errors(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        errors: Vec<String>,
    }
    serde_json::from_slice::<E>(body)
        .map(|e| {
            e.errors
                .iter()
                .take(3)
                .map(|s| crate::vm::guest_text(s))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"request_id":"x","data":{"data":{"other":"o","password":"p\u00e9\"w","n":5},"metadata":{"version":3}}}"#;

    #[test]
    fn picks_one_field_and_decodes_escapes() {
        assert_eq!(field(BODY.as_bytes(), "other").unwrap().as_str(), "o");
        assert_eq!(
            field(BODY.as_bytes(), "password").unwrap().as_str(),
            "pé\"w"
        );
        assert_eq!(field(BODY.as_bytes(), "nope"), Err(FieldError::Missing));
        assert_eq!(field(BODY.as_bytes(), "n"), Err(FieldError::NotAString));
        assert_eq!(
            field(br#"{"data":{"data":null,"metadata":{}}}"#, "a"),
            Err(FieldError::NoData)
        );
        assert_eq!(field(b"<html>", "a"), Err(FieldError::Malformed));
        assert!(check_data(BODY.as_bytes()).is_ok());
    }

    /// The bodies are what `bao server -dev` 2.7.2 sent (ids shortened).
    #[test]
    fn only_openbao_s_own_404_means_deleted() {
        assert_eq!(not_found(br#"{"errors":[]}"#), NotFound::Absent);
        let soft = br#"{"request_id":"r","lease_id":"","renewable":false,"lease_duration":0,"data":{"data":null,"metadata":{"created_time":"2026-12-01T01:18:42Z","custom_metadata":null,"deletion_time":"2026-12-01T01:18:42Z","destroyed":false,"version":2}},"wrap_info":null,"warnings":null,"auth":null}"#;
        assert_eq!(not_found(soft), NotFound::VersionGone);
        let destroyed = br#"{"data":{"data":null,"metadata":{"deletion_time":"","destroyed":true,"version":2}}}"#;
        assert_eq!(not_found(destroyed), NotFound::VersionGone);
        assert_eq!(
            not_found(br#"{"errors":["no handler for route \"nomount/metadata/a\". route entry not found."]}"#),
            NotFound::Error(r#"no handler for route "nomount/metadata/a". route entry not found."#.into())
        );
        for foreign in [
            &b"<html><body>404 Not Found</body></html>"[..],
            b"",
            b" \n",
            b"null",
            b"[]",
            b"{}",
            br#"{"message":"not found"}"#,
            br#"{"errors":[],"data":{}}"#,
            // A live version's data is not a deleted one.
            br#"{"data":{"data":{"f":"v"},"metadata":{"deletion_time":"x","destroyed":false}}}"#,
            br#"{"data":{"data":null,"metadata":{"deletion_time":"","destroyed":false}}}"#,
        ] {
            assert!(
                matches!(not_found(foreign), NotFound::Foreign(_)),
                "{:?}",
                String::from_utf8_lossy(foreign)
            );
        }
    }

    #[test]
    fn escapes_are_decoded_in_place() {
        for (raw, want) in [
            (r#""plain""#, "plain"),
            (r#""""#, ""),
            (r#""a\"b\\c\/d\b\f\n\r\t""#, "a\"b\\c/d\u{8}\u{c}\n\r\t"),
            (r#""\u00e9\u20ac\ud83d\ude00x""#, "é€😀x"),
            (r#""\\""#, "\\"),
        ] {
            let got = unescape(raw).unwrap();
            assert_eq!(got.as_str(), want, "{raw}");
            let inner = raw.len() - 2;
            assert_eq!(got.capacity(), inner, "{raw}: the buffer moved");
        }
        for bad in [
            "5",
            "null",
            r#"{"a":1}"#,
            r#""\ud83d""#,
            r#""\ude00""#,
            r#""\ud83dx""#,
            r#""\u12""#,
            r#""\q""#,
        ] {
            assert!(unescape(bad).is_none(), "{bad}");
        }
        // Through the whole field path too, with serde_json's own decoding
        // as the oracle.
        let body = r#"{"data":{"data":{"f":"\u00e9\"\\\ud83d\ude00\t"}}}"#;
        let want: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            field(body.as_bytes(), "f").unwrap().as_str(),
            want["data"]["data"]["f"].as_str().unwrap()
        );
    }

    /// Random strings, escaped every way JSON allows, decode as
    /// serde_json decodes them.
    #[test]
    fn unescape_agrees_with_serde_json() {
        let mut rng = fastrand::Rng::with_seed(7);
        let pool = [
            'a', 'é', '€', '😀', '"', '\\', '/', '\n', '\u{8}', '\u{c}', '\u{0}', '\u{1f}',
            '\u{7f}', ' ',
        ];
        for _ in 0..2000 {
            let mut raw = String::from("\"");
            for _ in 0..rng.usize(0..12) {
                let c = pool[rng.usize(0..pool.len())];
                let mut units = [0u16; 2];
                match rng.u8(0..3) {
                    0 if !matches!(c, '"' | '\\') && c >= ' ' => raw.push(c),
                    1 => {
                        // serde_json's own escaping (`\"`, `\\`, `\n`, `\u001f`).
                        let quoted = serde_json::to_string(&c.to_string()).unwrap();
                        raw.push_str(&quoted[1..quoted.len() - 1]);
                    }
                    _ => {
                        for u in c.encode_utf16(&mut units) {
                            raw.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                }
            }
            raw.push('"');
            let want: String = serde_json::from_str(&raw).unwrap();
            assert_eq!(unescape(&raw).unwrap().as_str(), want, "{raw}");
        }
    }

    #[test]
    fn metadata_tells_a_deletion_time_and_a_destroyed_version_apart() {
        let m = metadata(br#"{"data":{"current_version":2,"versions":{"1":{"deletion_time":"","destroyed":false},"2":{"deletion_time":"2026-01-01T00:00:00Z","destroyed":false}}}}"#).unwrap();
        assert_eq!(
            m,
            Metadata {
                current_version: 2,
                current: VersionState::DeletionTimeSet
            }
        );
        let m = metadata(br#"{"data":{"current_version":1,"versions":{"1":{"deletion_time":"","destroyed":false}}}}"#).unwrap();
        assert_eq!(m.current, VersionState::Live);
        // `delete_version_after`, as `bao server -dev` 2.7.2 writes it: a
        // deletion time in the future, which only the data read judges.
        let m = metadata(br#"{"data":{"current_version":1,"delete_version_after":"1h0m0s","versions":{"1":{"created_time":"2026-12-01T02:12:16.055720809Z","deletion_time":"2026-12-01T03:12:16.055720809Z","destroyed":false}}}}"#).unwrap();
        assert_eq!(m.current, VersionState::DeletionTimeSet);
        let m = metadata(br#"{"data":{"current_version":1,"versions":{"1":{"deletion_time":"2999-01-01T00:00:00Z","destroyed":true}}}}"#).unwrap();
        assert_eq!(m.current, VersionState::Destroyed);
        // A current version the metadata does not list: live (its data
        // read decides anyway).
        let m = metadata(br#"{"data":{"current_version":3,"versions":{}}}"#).unwrap();
        assert_eq!(m.current, VersionState::Live);
    }
}
