//! A strict reader of the Prometheus text format (0.0.4) for tests: every
//! sample must belong to a family declared by `# TYPE` before it (a
//! histogram's `_bucket`/`_sum`/`_count`), label values are unescaped, and
//! anything else is an error, so a test fails on output a scraper or
//! node-exporter's textfile collector would reject or misread.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

/// One sample: its name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → type.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the one sample named `name` whose labels include
    /// `labels`, if exactly one matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.samples.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        });
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }
}

pub fn parse(text: &str) -> Result<Exposition> {
    let mut e = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').with_context(at)?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                bail!("{}: type {ty:?} is not one of the text format's", at());
            }
            if e.types.insert(name.into(), ty.into()).is_some() {
                bail!("{}: family declared twice", at());
            }
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        if line.starts_with('#') {
            bail!("{}: a comment the exporter should not write", at());
        }
        let s = sample(line).with_context(at)?;
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                s.name
                    .strip_suffix(suf)
                    .filter(|f| e.types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&s.name);
        if !e.types.contains_key(family) {
            bail!("{}: no # TYPE for {family}", at());
        }
        e.samples.push(s);
    }
    Ok(e)
}

fn sample(line: &str) -> Result<Sample> {
    let (name_labels, value) = line.rsplit_once(' ').context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    let (name, mut rest) = match name_labels.split_once('{') {
        Some((n, r)) => (n, r.strip_suffix('}').context("unclosed labels")?),
        None => (name_labels, ""),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => bail!("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => bail!("bad escape {other:?}"),
                },
                Some((_, '\n')) => bail!("raw newline in a label value"),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            bail!("label {key} twice");
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

/// `GET /metrics` over the Unix socket at `path`: the status code, the
/// content type and the body.
pub fn scrape(path: &std::path::Path) -> Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    let code: u16 = head
        .split(' ')
        .nth(1)
        .context("no status")?
        .parse()
        .context("status code")?;
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    Ok((code, ctype, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_should_and_refuses_the_rest() {
        let e = parse(
            "# HELP a_total x\n# TYPE a_total counter\na_total{vm=\"q\\\"\\\\\\n\",k=\"b\"} 3\n\
             # TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n",
        )
        .unwrap();
        assert_eq!(e.get("a_total", &[("vm", "q\"\\\n")]), Some(3.0));
        assert_eq!(e.get("h_count", &[]), Some(1.0));
        for bad in [
            "x 1\n",
            "# TYPE x counter\n# EOF\n",
            "# TYPE x counter\nx{a=\"b} 1\n",
            "# TYPE x stateset\n",
            "# TYPE x counter\nx_total 1\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
