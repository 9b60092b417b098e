//! What a `mask` rule hides in responses: fields by name and values by
//! pattern.
//!
//! A rule's `mask` list holds entries of two kinds:
//!
//! - a name glob (`email`, `*_ssn`, `card_*`): the field (a result column)
//!   with that name is hidden whole;
//! - `value:email`, `value:card` (13 to 19 digits, spaces or dashes between
//!   them, that pass the Luhn check), `value:iban` (that pass the ISO 7064
//!   mod-97 check), or `value:re:<regex>`: every match inside a text value
//!   is replaced by as many `*`.
//!
//! The list is checked when the policy loads (a bad regex is an error at
//! its line), and compiled once per distinct list.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use globset::{Glob, GlobMatcher};
use regex::Regex;

/// A compiled `mask` list.
#[derive(Debug)]
pub struct MaskSpec {
    names: Vec<GlobMatcher>,
    values: Vec<ValuePattern>,
    /// Every field hidden (a list that does not compile: fail closed).
    all: bool,
}

#[derive(Debug)]
enum ValuePattern {
    Email(Regex),
    Card(Regex),
    Iban(Regex),
    Custom(Regex),
}

impl MaskSpec {
    /// Compiles a rule's `mask` list.
    pub fn parse(entries: &[String]) -> Result<MaskSpec, String> {
        let mut spec = MaskSpec {
            names: Vec::new(),
            values: Vec::new(),
            all: false,
        };
        let re = |s: &str| Regex::new(s).map_err(|e| e.to_string());
        for e in entries {
            match e.strip_prefix("value:") {
                Some("email") => spec.values.push(ValuePattern::Email(re(
                    r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}",
                )?)),
                Some("card") => spec
                    .values
                    .push(ValuePattern::Card(re(r"(?-u:\b)[0-9](?:[ \-]?[0-9]){12,18}(?-u:\b)")?)),
                Some("iban") => spec.values.push(ValuePattern::Iban(re(
                    r"(?-u:\b)[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]){11,30}(?-u:\b)",
                )?)),
                Some(v) => match v.strip_prefix("re:") {
                    Some(r) => spec.values.push(ValuePattern::Custom(
                        re(r).map_err(|err| format!("value:re:{r}: {err}"))?,
                    )),
                    None => {
                        return Err(format!(
                            "{e}: a value pattern is value:email, value:card, value:iban or value:re:<regex>"
                        ))
                    }
                },
                None => spec.names.push(
                    Glob::new(&e.to_ascii_lowercase())
                        .map_err(|err| format!("{e}: {err}"))?
                        .compile_matcher(),
                ),
            }
        }
        Ok(spec)
    }

    /// A spec that hides every field (where the agent cannot tell which
    /// mask applies: fail closed).
    pub fn hide_all() -> MaskSpec {
        MaskSpec {
            names: Vec::new(),
            values: Vec::new(),
            all: true,
        }
    }

    /// Whether the field called `name` is hidden whole.
    pub fn hides(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        self.all || self.names.iter().any(|g| g.is_match(&lower))
    }

    /// Whether it hides fields by name (or all of them).
    pub fn hides_names(&self) -> bool {
        self.all || !self.names.is_empty()
    }

    /// Whether it looks into values at all.
    pub fn has_value_patterns(&self) -> bool {
        !self.values.is_empty()
    }

    /// `text` with every value pattern's matches replaced by `*`; `None`
    /// when nothing matched.
    pub fn mask_text(&self, text: &str) -> Option<String> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for p in &self.values {
            let (re, check): (&Regex, fn(&str) -> bool) = match p {
                ValuePattern::Email(r) | ValuePattern::Custom(r) => (r, |_| true),
                ValuePattern::Card(r) => (r, luhn),
                ValuePattern::Iban(r) => (r, iban),
            };
            for m in re.find_iter(text) {
                if check(m.as_str()) {
                    spans.push((m.start(), m.end()));
                }
            }
        }
        if spans.is_empty() {
            return None;
        }
        // One pass over the text with the spans sorted (merged as it goes).
        spans.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut spans = spans.into_iter().peekable();
        let mut end = 0;
        for (i, c) in text.char_indices() {
            while let Some(&(s, e)) = spans.peek() {
                if s > i {
                    break;
                }
                end = end.max(e);
                spans.next();
            }
            if i < end && !c.is_whitespace() && c != '-' {
                out.push('*');
            } else {
                out.push(c);
            }
        }
        Some(out)
    }
}

/// The Luhn check of a card number (digits only; 13 to 19 of them).
fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d = d * 2;
                if d > 9 {
                    d - 9
                } else {
                    d
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The ISO 13616 check of an IBAN (mod 97 = 1).
fn iban(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !compact.is_ascii() || compact.len() < 15 || compact.len() > 34 {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Compiled mask lists, by list (rules are few; lists repeat).
#[derive(Default)]
pub struct MaskCache {
    inner: Mutex<HashMap<Vec<String>, Arc<MaskSpec>>>,
}

impl MaskCache {
    /// The compiled spec of `entries`; a list the policy check let through
    /// always compiles, and one that does not hides every value (fail
    /// closed).
    pub fn get(&self, entries: &[String]) -> Arc<MaskSpec> {
        if let Some(s) = self.inner.lock().ok().and_then(|m| m.get(entries).cloned()) {
            return s;
        }
        let spec = Arc::new(MaskSpec::parse(entries).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a mask list that does not compile hides every field");
            MaskSpec {
                names: Vec::new(),
                values: Vec::new(),
                all: true,
            }
        }));
        if let Ok(mut m) = self.inner.lock() {
            if m.len() < 1024 {
                m.insert(entries.to_vec(), spec.clone());
            }
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: &[&str]) -> MaskSpec {
        MaskSpec::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn names_and_values_are_masked_and_bad_entries_refused() {
        let s = spec(&["email", "*_ssn", "value:email", "value:card", "value:iban"]);
        assert!(s.hides("EMAIL") && s.hides("customer_ssn") && !s.hides("name"));
        assert_eq!(
            s.mask_text("mail ann@example.com now").as_deref(),
            Some(
                "mail ********** now"
                    .replace("**********", &"*".repeat(15))
                    .as_str()
            )
        );
        // A card number that passes Luhn, one that does not.
        assert_eq!(
            s.mask_text("card 4111 1111 1111 1111.").as_deref(),
            Some("card **** **** **** ****.")
        );
        assert_eq!(s.mask_text("order 4111 1111 1111 1112"), None);
        assert_eq!(
            s.mask_text("IBAN GB82WEST12345698765432").as_deref(),
            Some("IBAN ********************** ".trim_end())
        );
        assert_eq!(s.mask_text("GB00WEST12345698765432"), None);
        assert_eq!(s.mask_text("nothing here"), None);
        // Unicode digits are not card or IBAN digits (and do not panic).
        assert_eq!(s.mask_text("GB\u{966}\u{966}WEST12345698765"), None);
        // Many matches cost one pass.
        let many = "a@b.cc ".repeat(200_000);
        let masked = s.mask_text(&many).unwrap();
        assert_eq!(masked.len(), many.len());
        assert!(!masked.contains('@'));
        for bad in ["value:phone", "value:re:(", "[unclosed"] {
            assert!(MaskSpec::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
