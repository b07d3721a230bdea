//! Reading an AdmissionReview off the wire: only `admission.k8s.io/v1` reviews of `UPDATE` on `nodes`
//! are judged; anything else is a clear client error, never a panic.
use k8s_openapi::api::core::v1::Node;
use kube::core::{
    GroupVersionResource,
    admission::{
        AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
    },
};

/// Why a request body is not a review this webhook can judge.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not an AdmissionReview of a Node: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error(
        "expected kind AdmissionReview, apiVersion {META_API_VERSION_V1}; got kind {kind:?}, apiVersion {api_version:?}"
    )]
    NotAdmissionReviewV1 { kind: String, api_version: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("this webhook reviews nodes (core/v1, no subresource); got {resource}")]
    WrongResource { resource: String },
    #[error("the AdmissionReview of an UPDATE lacks {0}")]
    MissingObject(&'static str),
}

/// A review this webhook judges: an update of a Node, before and after.
#[derive(Debug)]
pub struct NodeUpdate {
    pub request: AdmissionRequest<Node>,
    pub old: Node,
    pub new: Node,
}

impl NodeUpdate {
    pub fn name(&self) -> &str {
        &self.request.name
    }

    pub fn username(&self) -> &str {
        self.request.user_info.username.as_deref().unwrap_or_default()
    }

    /// An answer to this review that lets the update through unchanged.
    pub fn allow(&self) -> AdmissionResponse {
        AdmissionResponse::from(&self.request)
    }
}

/// A well-formed review of nodes.
#[derive(Debug)]
pub enum Review {
    /// An update of a Node: judged.
    Update(Box<NodeUpdate>),
    /// Another operation on nodes (create, delete, connect): nothing to guard, allowed.
    Other(Box<AdmissionResponse>),
}

/// Parses an AdmissionReview body, once: straight into Nodes. Only a body that fails is read again,
/// for the resource it names, so a review of pods is refused as one.
pub fn parse(body: &[u8]) -> Result<Review, ReviewError> {
    let review: AdmissionReview<Node> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            let named = serde_json::from_slice::<ResourceOnly>(body)
                .ok()
                .and_then(|only| only.request);
            return Err(match named {
                Some(named) => match check_resource(&named.resource, named.sub_resource.as_deref()) {
                    Err(wrong) => wrong,
                    Ok(()) => ReviewError::Malformed(error),
                },
                None => ReviewError::Malformed(error),
            });
        }
    };
    if review.types.kind != META_KIND || review.types.api_version != META_API_VERSION_V1 {
        return Err(ReviewError::NotAdmissionReviewV1 {
            kind: review.types.kind,
            api_version: review.types.api_version,
        });
    }
    let mut request: AdmissionRequest<Node> = review.try_into().map_err(|_| ReviewError::NoRequest)?;
    check_resource(&request.resource, request.sub_resource.as_deref())?;
    if !matches!(request.operation, Operation::Update) {
        return Ok(Review::Other(Box::new(AdmissionResponse::from(&request))));
    }
    let new = request
        .object
        .take()
        .ok_or(ReviewError::MissingObject("object"))?;
    let old = request
        .old_object
        .take()
        .ok_or(ReviewError::MissingObject("oldObject"))?;
    Ok(Review::Update(Box::new(NodeUpdate { request, old, new })))
}

/// The resource a review names, read only from a body that is not a review of Nodes.
#[derive(serde::Deserialize)]
struct ResourceOnly {
    request: Option<RequestedResource>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestedResource {
    resource: GroupVersionResource,
    sub_resource: Option<String>,
}

/// Nodes (core/v1) and no subresource, or the error naming what it is.
fn check_resource(resource: &GroupVersionResource, sub_resource: Option<&str>) -> Result<(), ReviewError> {
    let sub_resource = sub_resource.unwrap_or_default();
    let is_nodes = resource.group.is_empty() && resource.version == "v1" && resource.resource == "nodes";
    if is_nodes && sub_resource.is_empty() {
        return Ok(());
    }
    let group = if resource.group.is_empty() {
        "core"
    } else {
        &resource.group
    };
    let sub = if sub_resource.is_empty() {
        String::new()
    } else {
        format!("/{sub_resource}")
    };
    Err(ReviewError::WrongResource {
        resource: format!("{group}/{}/{}{sub}", resource.version, resource.resource),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(resource: &str, operation: &str, object: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Node"},
                "resource": {"group": "", "version": "v1", "resource": resource},
                "name": "n-1",
                "operation": operation,
                "userInfo": {"username": "alice"},
                "object": object,
                "oldObject": object,
            }
        }))
        .unwrap()
    }

    fn a_node() -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n-1"}})
    }

    #[test]
    fn a_node_update_is_judged() {
        let Review::Update(update) = parse(&review("nodes", "UPDATE", a_node())).unwrap() else {
            panic!("not an update");
        };
        assert_eq!(update.name(), "n-1");
        assert_eq!(update.username(), "alice");
        assert_eq!(update.new.metadata.name.as_deref(), Some("n-1"));
        assert!(update.allow().allowed);
    }

    #[test]
    fn other_operations_on_nodes_are_allowed() {
        assert!(matches!(
            parse(&review("nodes", "DELETE", a_node())).unwrap(),
            Review::Other(response) if response.allowed
        ));
    }

    #[test]
    fn another_resource_is_refused_naming_it() {
        let error = parse(&review("pods", "UPDATE", a_node())).unwrap_err();
        assert_eq!(
            error.to_string(),
            "this webhook reviews nodes (core/v1, no subresource); got core/v1/pods"
        );
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        let error = parse(&review("pods", "UPDATE", pod)).unwrap_err();
        assert!(matches!(error, ReviewError::WrongResource { .. }), "{error}");
    }

    #[test]
    fn an_object_that_is_not_a_node_is_refused() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        let error = parse(&review("nodes", "UPDATE", pod)).unwrap_err();
        assert!(matches!(error, ReviewError::Malformed(_)), "{error}");
        assert!(error.to_string().contains("Pod"), "{error}");
    }

    #[test]
    fn garbage_and_other_kinds_are_refused() {
        assert!(matches!(parse(b"{not json"), Err(ReviewError::Malformed(_))));
        assert!(matches!(parse(b""), Err(ReviewError::Malformed(_))));
        let v1beta1 = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#;
        assert!(matches!(
            parse(v1beta1),
            Err(ReviewError::NotAdmissionReviewV1 { .. })
        ));
        let empty = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        assert!(matches!(parse(empty), Err(ReviewError::NoRequest)));
    }
}
