//! The agent's only Kubernetes calls: read its own Node's annotations, and server-side apply its
//! annotations to that Node under its own field manager. Metadata only: the Node's spec and status
//! (images, conditions) are never fetched.
use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client,
    api::{PartialObjectMetaExt, Patch, PatchParams},
};

use super::{Error, annotations::AgentAnnotations, api_call};
use crate::keys;

/// This agent's own Node.
#[derive(Clone)]
pub struct OwnNode {
    api: Api<Node>,
    client: Client,
    name: String,
}

impl OwnNode {
    pub fn new(client: Client, name: String) -> Self {
        OwnNode {
            api: Api::all(client.clone()),
            client,
            name,
        }
    }

    /// The cheapest request there is (`GET /version`: public, no etcd read), made only to keep the
    /// pooled TLS connection open, so the next notice's write does not pay a new handshake.
    pub async fn keep_connection_warm(&self) -> Result<(), kube::Error> {
        api_call(self.client.apiserver_version()).await.map(|_| ())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Node's current annotations (all of them; the caller picks its own).
    pub async fn annotations(&self) -> Result<BTreeMap<String, String>, Error> {
        let meta = api_call(self.api.get_metadata(&self.name))
            .await
            .map_err(|source| Error::ReadNode {
                node: self.name.clone(),
                source,
            })?;
        Ok(meta.metadata.annotations.unwrap_or_default())
    }

    /// Makes the agent's annotations on the Node exactly `annotations`. Forced: these keys belong
    /// to the agent, whoever touched them last. Applying the same set again changes nothing.
    pub async fn apply(&self, annotations: &AgentAnnotations) -> Result<(), Error> {
        let patch = ObjectMeta {
            name: Some(self.name.clone()),
            annotations: Some(annotations.to_node()),
            ..ObjectMeta::default()
        }
        .into_request_partial::<Node>();
        let params = PatchParams::apply(keys::AGENT_FIELD_MANAGER).force();
        api_call(
            self.api
                .patch_metadata(&self.name, &params, &Patch::Apply(&patch)),
        )
        .await
        .map_err(|source| Error::AnnotateNode {
            node: self.name.clone(),
            source,
        })?;
        Ok(())
    }
}
