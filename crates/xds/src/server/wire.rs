//! gRPC framing and response encoding done by hand, for memory: tonic's stream encoder keeps a
//! per-stream buffer as large as the largest message ever sent on it (a full state of 10,000
//! workloads is ~4 MB, times every connected client), and its decoder likewise for requests
//! (a reconnect's `initial_resource_versions`). Here each response is encoded straight from the
//! shared resources into one exact-size buffer that is freed once sent, and request buffers
//! shrink back after a large message.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body_util::BodyExt;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tonic::Status;

use crate::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use crate::resources::XdsResource;

/// gRPC message prefix: compressed flag and big-endian length.
const PREFIX: usize = 5;
/// A request buffer that grew past this is reallocated after the message is decoded.
const SHRINK_AFTER: usize = 64 * 1024;

/// The decoded request stream of one call.
pub(crate) type Requests =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Send>>;

fn str_len(tag: u32, s: &[u8]) -> usize {
    if s.is_empty() {
        0
    } else {
        bytes_field_len(tag, s.len())
    }
}

fn bytes_field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_str(tag: u32, s: &[u8], buf: &mut Vec<u8>) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s);
    }
}

fn any_len(r: &XdsResource) -> usize {
    str_len(1, r.any.type_url.as_bytes()) + str_len(2, &r.any.value)
}

/// The wire form of a version: 16 lower-case hex digits.
fn version_text(r: &XdsResource) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((r.version.0 >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

fn resource_len(r: &XdsResource) -> usize {
    bytes_field_len(1, 16) + bytes_field_len(2, any_len(r)) + str_len(3, r.name.as_bytes())
}

/// One `DeltaDiscoveryResponse`, gRPC-framed, encoded from the shared resources without
/// copying them into intermediate messages. Field order and bytes are what prost produces
/// for the same message (checked by a test).
pub(crate) fn encode_response(
    system_version_info: &str,
    type_url: &str,
    nonce: &str,
    resources: &[Arc<XdsResource>],
    removed: &[Arc<str>],
) -> Result<Bytes, Status> {
    let body_len = str_len(1, system_version_info.as_bytes())
        + resources
            .iter()
            .map(|r| bytes_field_len(2, resource_len(r)))
            .sum::<usize>()
        + str_len(4, type_url.as_bytes())
        + str_len(5, nonce.as_bytes())
        + removed
            .iter()
            .map(|n| bytes_field_len(6, n.len()))
            .sum::<usize>();
    let len = u32::try_from(body_len).map_err(|_| {
        Status::resource_exhausted(format!(
            "discovery response of {body_len} bytes exceeds gRPC's 4 GiB message limit"
        ))
    })?;
    let mut buf = Vec::with_capacity(PREFIX + body_len);
    buf.put_u8(0);
    buf.put_u32(len);
    put_str(1, system_version_info.as_bytes(), &mut buf);
    for r in resources {
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(resource_len(r) as u64, &mut buf);
        // Resource.version (1) is always set.
        put_str(1, &version_text(r), &mut buf);
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(any_len(r) as u64, &mut buf);
        put_str(1, r.any.type_url.as_bytes(), &mut buf);
        put_str(2, &r.any.value, &mut buf);
        put_str(3, r.name.as_bytes(), &mut buf);
    }
    put_str(4, type_url.as_bytes(), &mut buf);
    put_str(5, nonce.as_bytes(), &mut buf);
    for n in removed {
        encode_key(6, WireType::LengthDelimited, &mut buf);
        encode_varint(n.len() as u64, &mut buf);
        buf.put_slice(n.as_bytes());
    }
    debug_assert_eq!(buf.len(), PREFIX + body_len);
    Ok(Bytes::from(buf))
}

/// Decodes the request body of a call into requests; stops after the first error.
pub(crate) fn decode_requests(body: tonic::body::Body, max_message: usize) -> Requests {
    struct St {
        body: tonic::body::Body,
        buf: BytesMut,
        eof: bool,
        failed: bool,
    }
    let init = St {
        body,
        buf: BytesMut::new(),
        eof: false,
        failed: false,
    };
    Box::pin(futures::stream::unfold(init, move |mut st| async move {
        if st.failed {
            return None;
        }
        loop {
            if st.buf.len() >= PREFIX {
                let compressed = st.buf[0];
                let len = u32::from_be_bytes([st.buf[1], st.buf[2], st.buf[3], st.buf[4]]) as usize;
                let fail = |st: St, status: Status| Some((Err(status), St { failed: true, ..st }));
                if compressed != 0 {
                    return fail(st, Status::unimplemented(
                        "compressed discovery requests are not supported; send them uncompressed",
                    ));
                }
                if len > max_message {
                    return fail(
                        st,
                        Status::resource_exhausted(format!(
                            "discovery request of {len} bytes is over the limit of {max_message}"
                        )),
                    );
                }
                if st.buf.len() >= PREFIX + len {
                    let decoded = DeltaDiscoveryRequest::decode(&st.buf[PREFIX..PREFIX + len]);
                    st.buf.advance(PREFIX + len);
                    if len > SHRINK_AFTER {
                        st.buf = BytesMut::from(&st.buf[..]);
                    }
                    return match decoded {
                        Ok(request) => Some((Ok(request), st)),
                        Err(e) => fail(
                            st,
                            Status::invalid_argument(format!("bad DeltaDiscoveryRequest: {e}")),
                        ),
                    };
                }
            }
            if st.eof {
                if !st.buf.is_empty() {
                    return Some((
                        Err(Status::invalid_argument(
                            "request stream ended inside a message",
                        )),
                        St { failed: true, ..st },
                    ));
                }
                return None;
            }
            match st.body.frame().await {
                None => st.eof = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        st.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Some((Err(Status::from_error(e.into())), St { failed: true, ..st }))
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use crate::resources::Version;

    fn res(name: &str, version: u64, value: &[u8]) -> Arc<XdsResource> {
        Arc::new(XdsResource {
            name: Arc::from(name),
            version: Version(version),
            any: prost_types::Any {
                type_url: "type.googleapis.com/istio.workload.Address".into(),
                value: value.to_vec(),
            },
        })
    }

    #[test]
    fn hand_encoding_matches_prost_byte_for_byte() {
        let resources = [
            res("a", 0x0123_4567_89ab_cdef, b"\x0a\x03abc"),
            res("ns/b.ns.svc.cluster.local", u64::MAX, &[7u8; 300]),
            res("empty-body", 0, b""),
        ];
        let removed: Vec<Arc<str>> = vec![Arc::from("gone"), Arc::from("x".repeat(200).as_str())];
        for (sv, nonce, rs, rm) in [
            ("7", "1-2", &resources[..], &removed[..]),
            ("", "n", &[][..], &[][..]),
        ] {
            let ours = encode_response(
                sv,
                "type.googleapis.com/istio.workload.Address",
                nonce,
                rs,
                rm,
            )
            .unwrap();
            let theirs = DeltaDiscoveryResponse {
                system_version_info: sv.into(),
                resources: rs
                    .iter()
                    .map(|r| Resource {
                        version: r.version.to_string(),
                        resource: Some(r.any.clone()),
                        name: r.name.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                type_url: "type.googleapis.com/istio.workload.Address".into(),
                nonce: nonce.into(),
                removed_resources: rm.iter().map(|n| n.to_string()).collect(),
            }
            .encode_to_vec();
            assert_eq!(ours[0], 0);
            assert_eq!(
                u32::from_be_bytes([ours[1], ours[2], ours[3], ours[4]]) as usize,
                theirs.len()
            );
            assert_eq!(&ours[PREFIX..], &theirs[..]);
        }
    }

    fn frame(msg: &DeltaDiscoveryRequest) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    async fn decode_all(bytes: Vec<u8>, max: usize) -> Vec<Result<DeltaDiscoveryRequest, Status>> {
        use futures::StreamExt;
        // Split into awkward chunks to exercise reassembly.
        let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = bytes
            .chunks(3)
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            chunks,
        )));
        decode_requests(body, max).collect().await
    }

    #[tokio::test]
    async fn decodes_split_and_pipelined_requests_and_rejects_bad_ones() {
        let a = DeltaDiscoveryRequest {
            type_url: "t".into(),
            response_nonce: "n1".into(),
            ..Default::default()
        };
        let b = DeltaDiscoveryRequest {
            initial_resource_versions: (0..5000)
                .map(|i| (format!("name-{i}"), "v".into()))
                .collect(),
            ..Default::default()
        };
        let mut bytes = frame(&a);
        bytes.extend(frame(&b));
        bytes.extend(frame(&a));
        let got = decode_all(bytes, 1 << 20).await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap(), &a);
        assert_eq!(got[1].as_ref().unwrap(), &b);
        assert_eq!(got[2].as_ref().unwrap(), &a);

        let got = decode_all(frame(&b), 1000).await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].as_ref().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );

        let mut compressed = frame(&a);
        compressed[0] = 1;
        let got = decode_all(compressed, 1 << 20).await;
        assert_eq!(
            got[0].as_ref().unwrap_err().code(),
            tonic::Code::Unimplemented
        );

        let mut truncated = frame(&a);
        truncated.pop();
        let got = decode_all(truncated, 1 << 20).await;
        assert_eq!(
            got[0].as_ref().unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        let got = decode_all(vec![0, 0, 0, 0, 2, 0xff, 0xff], 1 << 20).await;
        assert_eq!(
            got[0].as_ref().unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
