//! The OpenBao / Vault JSON replies as the host agent's source reads them
//! (`openbao::reply`): KV v2 data and metadata, login / lookup replies and
//! error lists. The store is a network peer; a compromised or confused one
//! can send anything. Input: one line naming the field to pick, then the
//! body. Invariants: no panic; for a UTF-8 JSON object (as HTTP JSON is)
//! without repeated keys, a field is taken only when it is under
//! `data.data`, as that string; a reply said to hold data has an object
//! there; metadata gives the reply's `current_version`; the error
//! text is at most three bounded entries with no control, format or
//! separator character left unescaped.

use serde_json::Value;
use vmcred_fuzz::is_dangerous_char;
use vmcred_host::openbao::reply;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let (field, body) = match data.iter().position(|&b| b == b'\n') {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (&b"password"[..], data),
        };
        let Ok(field) = std::str::from_utf8(field) else {
            return;
        };
        // serde_json does not check the UTF-8 of strings it skips: the
        // comparisons below hold for UTF-8 bodies (which HTTP JSON is).
        let utf8 = std::str::from_utf8(body).is_ok();
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        // The comparisons need serde_json::Value to hold the body (it
        // refuses some grammatical JSON: numbers out of f64's range, lone
        // surrogates) and objects where KV v2 has them: serde also reads a
        // struct from an array (`[[880]]` is metadata version 880), a
        // leniency that gives nothing a well-formed reply could not.
        let comparable = utf8
            && !has_duplicate_keys(body)
            && parsed
                .as_ref()
                .is_some_and(|v| v.is_object() && v.get("data").is_some_and(Value::is_object));
        let inner = parsed
            .as_ref()
            .and_then(|v| v.get("data"))
            .and_then(|d| d.get("data"));

        let value = reply::field(body, field);
        if let (Ok(value), true) = (value, comparable) {
            let inner = inner.expect("a field taken from a reply that is not KV v2 data");
            let obj = inner.as_object().expect("a field taken from a non-object");
            let seen = obj.get(field).expect("a field taken that is not there");
            assert_eq!(seen.as_str(), Some(value.as_str()), "the field's value");
        }
        if reply::check_data(body).is_ok() && comparable {
            let inner = inner.expect("data accepted from a reply that is not KV v2 data");
            assert!(inner.is_object(), "data accepted that is not an object");
        }
        let meta = reply::metadata(body);
        if let (Ok(m), true) = (meta, comparable) {
            let v = parsed.as_ref().expect("comparable, so parsed");
            let cur = v["data"]["current_version"].as_u64();
            assert_eq!(cur, Some(m.current_version), "current_version");
        }
        let _ = serde_json::from_slice::<reply::AuthReply>(body);
        let _ = serde_json::from_slice::<reply::LookupReply>(body);

        let text = reply::errors(body);
        assert!(text.len() < 3 * 4096, "error text of {} bytes", text.len());
        assert!(
            !text.chars().any(|c| is_dangerous_char(c, true)),
            "unescaped character in {text:?}"
        );
    });
}

/// Whether any JSON object in `body` repeats a key (a cheap over-estimate
/// is fine: it only switches off the value comparisons).
fn has_duplicate_keys(body: &[u8]) -> bool {
    fn walk(v: &Value) -> usize {
        match v {
            Value::Object(m) => m.len() + m.values().map(walk).sum::<usize>(),
            Value::Array(a) => a.iter().map(walk).sum(),
            _ => 0,
        }
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return true;
    };
    // Count keys as the text has them: every `":` after a string outside
    // another string is a key. Compare with the map's count.
    let mut keys = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    let mut prev_was_str_end = false;
    for &b in body {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
                prev_was_str_end = true;
                continue;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b':' if prev_was_str_end => keys += 1,
            b' ' | b'\t' | b'\n' | b'\r' => continue,
            _ => {}
        }
        prev_was_str_end = false;
    }
    keys != walk(&v)
}
