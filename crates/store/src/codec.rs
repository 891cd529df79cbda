//! Binary encoding of stored rows. Hand-written rather than serde so values stay raw bytes and
//! the format is pinned here; every decode is checked, since a file can be damaged.

use crate::{Event, EventKind, KeyValue};

#[derive(Debug, thiserror::Error)]
#[error("malformed stored record: {0}")]
pub(crate) struct DecodeError(&'static str);

/// A row of the key table: the key is the table key, the rest is here.
pub(crate) fn encode_row(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + kv.value.len());
    put_counters(&mut out, kv);
    out.extend_from_slice(&kv.value);
    out
}

pub(crate) fn decode_row(key: &str, mut bytes: &[u8]) -> Result<KeyValue, DecodeError> {
    let (create_revision, mod_revision, version) = take_counters(&mut bytes)?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: bytes.to_vec(),
        create_revision,
        mod_revision,
        version,
    })
}

/// The events of one revision, as one row of the log table.
pub(crate) fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    put_len(&mut out, events.len());
    for event in events {
        out.push(match event.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        put_kv(&mut out, &event.kv);
        match &event.prev {
            Some(prev) => {
                out.push(1);
                put_kv(&mut out, prev);
            }
            None => out.push(0),
        }
    }
    out
}

pub(crate) fn decode_events(mut bytes: &[u8]) -> Result<Vec<Event>, DecodeError> {
    let count = take_len(&mut bytes)?;
    // Each event takes well over one byte, which bounds the allocation on a damaged count.
    let mut events = Vec::with_capacity(count.min(bytes.len()));
    for _ in 0..count {
        let kind = match take(&mut bytes, 1)?[0] {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            _ => return Err(DecodeError("unknown event kind")),
        };
        let kv = take_kv(&mut bytes)?;
        let prev = match take(&mut bytes, 1)?[0] {
            0 => None,
            1 => Some(take_kv(&mut bytes)?),
            _ => return Err(DecodeError("bad previous-value flag")),
        };
        events.push(Event { kind, kv, prev });
    }
    if !bytes.is_empty() {
        return Err(DecodeError("trailing bytes after events"));
    }
    Ok(events)
}

fn put_counters(out: &mut Vec<u8>, kv: &KeyValue) {
    for n in [kv.create_revision, kv.mod_revision, kv.version] {
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Keys and values are far below 4 GiB; redb itself caps values lower than that.
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

fn put_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    put_len(out, kv.key.len());
    out.extend_from_slice(kv.key.as_bytes());
    put_len(out, kv.value.len());
    out.extend_from_slice(&kv.value);
    put_counters(out, kv);
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if bytes.len() < n {
        return Err(DecodeError("truncated"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_i64(bytes: &mut &[u8]) -> Result<i64, DecodeError> {
    let mut buf = [0; 8];
    buf.copy_from_slice(take(bytes, 8)?);
    Ok(i64::from_le_bytes(buf))
}

fn take_len(bytes: &mut &[u8]) -> Result<usize, DecodeError> {
    let mut buf = [0; 4];
    buf.copy_from_slice(take(bytes, 4)?);
    Ok(u32::from_le_bytes(buf) as usize)
}

fn take_counters(bytes: &mut &[u8]) -> Result<(i64, i64, i64), DecodeError> {
    Ok((take_i64(bytes)?, take_i64(bytes)?, take_i64(bytes)?))
}

fn take_kv(bytes: &mut &[u8]) -> Result<KeyValue, DecodeError> {
    let key_len = take_len(bytes)?;
    let key = std::str::from_utf8(take(bytes, key_len)?)
        .map_err(|_| DecodeError("key is not UTF-8"))?
        .to_owned();
    let value_len = take_len(bytes)?;
    let value = take(bytes, value_len)?.to_vec();
    let (create_revision, mod_revision, version) = take_counters(bytes)?;
    Ok(KeyValue {
        key,
        value,
        create_revision,
        mod_revision,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kv() -> impl Strategy<Value = KeyValue> {
        (
            ".{0,8}",
            any::<Vec<u8>>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(key, value, create_revision, mod_revision, version)| KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision,
                    version,
                },
            )
    }

    fn event() -> impl Strategy<Value = Event> {
        (any::<bool>(), kv(), proptest::option::of(kv())).prop_map(|(put, kv, prev)| Event {
            kind: if put {
                EventKind::Put
            } else {
                EventKind::Delete
            },
            kv,
            prev,
        })
    }

    proptest! {
        #[test]
        fn events_round_trip(events in proptest::collection::vec(event(), 0..4)) {
            let bytes = encode_events(&events);
            prop_assert_eq!(decode_events(&bytes).unwrap(), events);
            // Any truncation is an error, never a panic or a wrong value.
            for cut in 0..bytes.len() {
                prop_assert!(decode_events(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn rows_round_trip(kv in kv()) {
            let row = encode_row(&kv);
            prop_assert!(decode_row(&kv.key, &row[..23]).is_err());
            prop_assert_eq!(decode_row(&kv.key, &row).unwrap(), kv);
        }

        #[test]
        fn garbage_never_panics(bytes in any::<Vec<u8>>()) {
            let _ = decode_events(&bytes);
            let _ = decode_row("k", &bytes);
        }
    }
}
