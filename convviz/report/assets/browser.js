// Unit browser: each model's feature maps live in a JSON block that is parsed the first time the
// model is chosen; only the chosen feature map's images exist as <img> elements.
(function () {
  "use strict";
  var root = document.getElementById("unit-browser");
  if (!root) return;
  var blocks = {}, cache = {};
  document.querySelectorAll("script.unit-data").forEach(function (el) { blocks[el.dataset.model] = el; });
  var selModel = document.getElementById("ub-model"), selLayer = document.getElementById("ub-layer"),
      selChannel = document.getElementById("ub-channel"), view = document.getElementById("ub-view"),
      count = document.getElementById("ub-count");

  function data(model) {
    if (!cache[model]) cache[model] = JSON.parse(blocks[model].textContent);
    return cache[model];
  }
  function layer() {
    var layers = data(selModel.value).layers;
    for (var i = 0; i < layers.length; i++) if (layers[i].name === selLayer.value) return layers[i];
    return layers[0];
  }
  function options(select, values, labels) {
    select.textContent = "";
    values.forEach(function (v, i) {
      var o = document.createElement("option");
      o.value = String(v); o.textContent = labels ? labels[i] : String(v);
      select.appendChild(o);
    });
  }
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) { e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function image(uri, alt, cls) {
    var img = el("img", { src: uri, alt: alt, "class": cls || "unit" });
    // Whole-number zoom to about 220 px wide keeps tiny receptive fields crisp and readable.
    img.onload = function () { img.width = img.naturalWidth * Math.max(1, Math.floor(220 / img.naturalWidth)); };
    return img;
  }
  function panel(title, body) { return el("div", { "class": "ub-panel" }, [el("h4", {}, [title])].concat(body)); }

  function sparkline(epochs, values) {
    var ns = "http://www.w3.org/2000/svg", w = 260, h = 90, pad = 22;
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "strongest activation per epoch");
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    var e0 = epochs[0], e1 = epochs[epochs.length - 1];
    function x(e) { return pad + (e1 === e0 ? 0 : (e - e0) / (e1 - e0)) * (w - 2 * pad); }
    function y(v) { return h - pad - (hi === lo ? 0.5 : (v - lo) / (hi - lo)) * (h - 2 * pad); }
    var line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", epochs.map(function (e, i) { return x(e) + "," + y(values[i]); }).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2c6fb7"); line.setAttribute("stroke-width", "2");
    svg.appendChild(line);
    epochs.forEach(function (e, i) {
      var dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", x(e)); dot.setAttribute("cy", y(values[i])); dot.setAttribute("r", "3"); dot.setAttribute("fill", "#2c6fb7");
      var tip = document.createElementNS(ns, "title"); tip.textContent = "epoch " + e + ": " + values[i];
      dot.appendChild(tip); svg.appendChild(dot);
    });
    [["epoch " + e0, pad, h - 4, "middle"], ["epoch " + e1, w - pad, h - 4, "middle"]].forEach(function (t) {
      var label = document.createElementNS(ns, "text");
      label.setAttribute("x", t[1]); label.setAttribute("y", t[2]); label.setAttribute("font-size", "10");
      label.setAttribute("text-anchor", t[3]); label.textContent = t[0];
      svg.appendChild(label);
    });
    return svg;
  }

  function show() {
    var model = selModel.value, l = layer(), channel = selChannel.value, unit = l.units[channel];
    var idx = l.channels.indexOf(Number(channel));
    count.textContent = (idx + 1) + " of " + l.channels.length + " projected feature maps" +
      (l.channels.length < l.total ? " (of " + l.total + " in " + l.name + ")" : "");
    view.textContent = "";
    view.appendChild(el("div", { "class": "ub-title", id: "ub-title" }, [model + " · " + l.name + " · feature map " + channel]));
    view.appendChild(panel("9 projections", [image(unit.projections, "projections of " + model + " " + l.name + " " + channel)]));
    view.appendChild(panel("9 input patches", [image(unit.patches, "patches of " + model + " " + l.name + " " + channel)]));
    if (unit.top9) {
      var rows = unit.top9.map(function (r) {
        return el("tr", {}, r.map(function (c) { return el("td", {}, [String(c)]); }));
      });
      var head = el("tr", {}, ["rank", "image", "activation", "y", "x"].map(function (c) { return el("th", {}, [c]); }));
      view.appendChild(panel("top-9 activations", [el("table", {}, [el("thead", {}, [head]), el("tbody", {}, rows)])]));
    }
    if (unit.evolution) {
      var evo = [], e = unit.evolution;
      if (e.image) evo.push(image(e.image, "projections over epochs " + e.image_epochs.join(", ")),
                            el("div", { "class": "note" }, ["epochs " + e.image_epochs.join(", ")]));
      if (e.activation) {
        var values = e.activation.map(function (v, i) { return "epoch " + e.epochs[i] + ": " + v; }).join(", ");
        evo.push(sparkline(e.epochs, e.activation), el("div", { "class": "note" }, ["strongest activation, " + values]));
      }
      view.appendChild(panel("evolution over training", evo));
    } else {
      view.appendChild(panel("evolution over training", [el("p", { "class": "note" }, ["not followed by the evolution study"])]));
    }
    if (history.replaceState) history.replaceState(null, "", "#unit=" + [model, l.name, channel].join("/"));
  }
  function fillChannels(wanted) {
    var l = layer();
    options(selChannel, l.channels);
    if (wanted !== undefined && l.units[wanted]) selChannel.value = wanted;
    show();
  }
  function fillLayers(wantedLayer, wantedChannel) {
    var layers = data(selModel.value).layers;
    options(selLayer, layers.map(function (x) { return x.name; }));
    if (wantedLayer) selLayer.value = wantedLayer;
    if (!selLayer.value) selLayer.selectedIndex = 0;
    fillChannels(wantedChannel);
  }
  function step(delta) {
    var n = selChannel.options.length;
    selChannel.selectedIndex = (selChannel.selectedIndex + delta + n) % n;
    show();
  }

  var models = Object.keys(blocks);
  if (!models.length) { view.textContent = "No feature maps to browse."; return; }
  options(selModel, models);
  selModel.addEventListener("change", function () { fillLayers(); });
  selLayer.addEventListener("change", function () { fillChannels(); });
  selChannel.addEventListener("change", show);
  document.getElementById("ub-prev").addEventListener("click", function () { step(-1); });
  document.getElementById("ub-next").addEventListener("click", function () { step(1); });
  root.addEventListener("keydown", function (ev) {
    if (ev.key === "ArrowRight") { step(1); ev.preventDefault(); }
    if (ev.key === "ArrowLeft") { step(-1); ev.preventDefault(); }
  });
  // A link such as index.html#unit=alexnet/conv5/17 opens that feature map.
  var m = /^#unit=([^/]+)\/([^/]+)\/(\d+)$/.exec(location.hash);
  if (m && blocks[m[1]]) { selModel.value = m[1]; fillLayers(m[2], m[3]); } else { fillLayers(); }
})();
