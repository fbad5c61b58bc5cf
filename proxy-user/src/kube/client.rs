//! The kube client, with a layer that tells [`Telemetry`] when the API server answers.
//!
//! Failures reach the agent as watcher errors, but recovery does not: a watch that resumes where
//! it left off and finds nothing new yields no event at all. The only sign of "connected again"
//! is the API server answering the watch request, so that is what this layer reports.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use kube::Client;
use kube::client::ClientBuilder;
use tower::Service;

use crate::metrics::{API_RESOURCES, Telemetry};

/// Which watched resource a request path is for: the last segment of a collection path.
fn resource_of(path: &str) -> Option<&'static str> {
    let last = path.rsplit('/').next()?;
    API_RESOURCES.iter().copied().find(|r| *r == last)
}

/// Reports every successful response for a watched resource as "API server reachable".
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<Request<B>> for Observed<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let resource = resource_of(req.uri().path());
        let telemetry = self.telemetry.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            if let (Some(resource), Ok(r)) = (resource, &result)
                && r.status().is_success()
            {
                telemetry.api_ok(resource);
            }
            result
        })
    }
}

/// A client for `config` whose successful requests for watched resources reach `telemetry`.
pub fn client(config: kube::Config, telemetry: Arc<Telemetry>) -> Result<Client, kube::Error> {
    let builder = ClientBuilder::try_from(config)?;
    Ok(builder
        .with_layer(&tower::layer::layer_fn(move |inner| Observed {
            inner,
            telemetry: telemetry.clone(),
        }))
        .build())
}

#[cfg(test)]
mod tests {
    use super::resource_of;

    #[test]
    fn request_paths_name_their_resource() {
        assert_eq!(resource_of("/api/v1/services"), Some("services"));
        assert_eq!(
            resource_of("/apis/discovery.k8s.io/v1/endpointslices"),
            Some("endpointslices")
        );
        assert_eq!(resource_of("/api/v1/nodes"), Some("nodes"));
        assert_eq!(
            resource_of("/apis/events.k8s.io/v1/namespaces/default/events"),
            None
        );
        assert_eq!(resource_of("/version"), None);
    }
}
