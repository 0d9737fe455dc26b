// Starts Swagger UI on the page's document (gateway/openapi/__init__.py, docs_page). A file of its
// own rather than an inline script, so the page's Content-Security-Policy can refuse inline code.
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    docExpansion: "list",
    defaultModelsExpandDepth: 0,
    // Swagger UI would otherwise send the document to an online validator.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
  });
});
