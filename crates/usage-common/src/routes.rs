//! A server's routes as one table of method, path and handler, from which its router is
//! built and nothing else; so the table is what the server answers, and a test can hold the
//! project's OpenAPI documents against it.

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};

/// One route: a method on a path, and its handler.
pub struct Route<S> {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<S>,
}

impl<S: Clone + Send + Sync + 'static> Route<S> {
    /// `handler` for `method` on `path` (axum's path syntax, `{name}` for a parameter).
    pub fn new<H, T>(method: Method, path: &'static str, handler: H) -> Route<S>
    where
        H: Handler<T, S>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a method axum can route");
        Route {
            method,
            path,
            handler: on(filter, handler),
        }
    }
}

/// The router of `routes`; two methods on one path share one entry.
pub fn router<S: Clone + Send + Sync + 'static>(routes: Vec<Route<S>>) -> Router<S> {
    routes.into_iter().fold(Router::new(), |router, route| {
        router.route(route.path, route.handler)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_methods_on_one_path_share_it() {
        async fn answer() -> &'static str {
            "ok"
        }
        let routes: Vec<Route<()>> = vec![
            Route::new(Method::PUT, "/things/{id}", answer),
            Route::new(Method::DELETE, "/things/{id}", answer),
            Route::new(Method::GET, "/", answer),
        ];
        let listed: Vec<_> = routes.iter().map(|r| (r.method.clone(), r.path)).collect();
        assert_eq!(listed.len(), 3);
        // Building the router must not panic on the shared path.
        let _ = router(routes);
    }
}
