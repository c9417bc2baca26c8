// Math for the site's own pages: pymdownx.arithmatex (generic mode) wraps formulas in
// <span class="arithmatex">\( ... \)</span> and <div class="arithmatex">\[ ... \]</div>; MathJax 3
// typesets only those. Notebook pages (mkdocs-jupyter) load their own MathJax 2 first, for the
// notebooks' $...$ math; there we leave it alone, so that the two versions never meet on one page.
(function () {
  if (window.MathJax) {
    return; // a notebook page: MathJax 2 is already in charge
  }
  window.MathJax = {
    tex: {
      inlineMath: [["\\(", "\\)"]],
      displayMath: [["\\[", "\\]"]],
      processEscapes: true,
      processEnvironments: true,
    },
    options: {
      ignoreHtmlClass: ".*|",
      processHtmlClass: "arithmatex",
    },
  };
  var script = document.createElement("script");
  script.src = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js";
  script.async = true;
  document.head.appendChild(script);
})();
