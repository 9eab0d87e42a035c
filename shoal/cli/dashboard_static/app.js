// Shoal dashboard: tables and a service graph, kept live by /api/stream
// (server-sent events). The token from the page's URL goes on every request.
(function () {
  "use strict";
  var token = new URLSearchParams(location.search).get("token") || "";
  var q = "token=" + encodeURIComponent(token);

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fill(id, headers, rows) {
    var t = document.getElementById(id);
    t.textContent = "";
    var tr = el("tr");
    headers.forEach(function (h) { tr.appendChild(el("th", {}, h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el("tr", r.attrs || {});
      r.cells.forEach(function (c) {
        var td = typeof c === "object" ? el("td", c.attrs || {}, c.text) : el("td", {}, String(c));
        row.appendChild(td);
      });
      t.appendChild(row);
    });
  }
  function cls(ok, text) { return {text: text, attrs: {"class": ok ? "ok" : "bad"}}; }

  function renderState(s) {
    fill("nodes", ["NAME", "STATUS", "ADDRESS"], s.nodes.map(function (n) {
      var st = (n.ready ? "Ready" : "NotReady") + (n.unschedulable ? ",SchedulingDisabled" : "");
      return {attrs: {"data-name": n.name}, cells: [n.name, cls(n.ready, st), n.ip]};
    }));
    fill("pods", ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "NODE", "IP"],
      s.pods.map(function (p) {
        var good = p.phase === "Running" || p.phase === "Succeeded";
        return {attrs: {"data-name": p.namespace + "/" + p.name, "class": "pod"},
                cells: [p.namespace, p.name, p.ready, cls(good, p.phase), p.restarts,
                        p.node, p.ip]};
      }));
    var rows = [];
    s.deployments.forEach(function (d) {
      var done = d.updated === d.replicas && d.available === d.replicas;
      rows.push({attrs: {"data-name": d.namespace + "/" + d.name},
                 cells: [d.namespace + "/" + d.name, d.ready + "/" + d.replicas,
                         d.updated, d.available, cls(done, done ? "complete" : "progressing"),
                         d.revision]});
      d.replicasets.forEach(function (r) {
        rows.push({attrs: {"class": "rs"}, cells: ["  └ " + r.name, r.ready + "/" + r.replicas,
                                                   "", r.available, "", r.revision]});
      });
    });
    fill("deployments", ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "ROLLOUT", "REVISION"], rows);
    fill("services", ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORTS"], s.services.map(function (v) {
      return {attrs: {"data-name": v.namespace + "/" + v.name},
              cells: [v.namespace, v.name, v.type, v.clusterIP, v.ports.join(",")]};
    }));
    fill("events", ["LAST", "TYPE", "REASON", "OBJECT", "MESSAGE"], s.events.map(function (e) {
      return {cells: [e.last, {text: e.type, attrs: {"class": e.type === "Warning" ? "warn" : ""}},
                      e.reason, e.namespace + "/" + e.object,
                      {text: e.message + (e.count > 1 ? " (x" + e.count + ")" : ""),
                       attrs: {"class": "msg"}}]};
    }));
  }

  // -- the service graph (d3 v3 force layout) --
  var svg = d3.select("#graph"), W = +svg.attr("width"), H = +svg.attr("height");
  svg.append("defs").append("marker").attr({id: "arrow", viewBox: "0 -5 10 10", refX: 22,
    refY: 0, markerWidth: 6, markerHeight: 6, orient: "auto"})
    .append("path").attr("d", "M0,-5L10,0L0,5").attr("fill", "#52606d");
  var linkLayer = svg.append("g"), nodeLayer = svg.append("g");
  var force = d3.layout.force().size([W, H]).charge(-700).linkDistance(170).gravity(0.08);
  var known = {};

  function fmt(x, digits) { return (x === null || x === undefined) ? "-" : x.toFixed(digits); }
  function edgeLabel(e) {
    if (e.protocol === "tcp") return fmt(e.rps, 2) + " conn/s " + fmt(e.bytes_per_second / 1024, 1) + " KiB/s" + (e.mtls ? " mTLS" : " plain");
    return fmt(e.rps, 2) + " rps, " + fmt(e.error_rate * 100, 0) + "% err, p99 " + fmt(e.p99_ms, 0) + " ms," + (e.mtls ? " mTLS" : " plain");
  }
  function short(id) { var i = id.indexOf("/"); return i < 0 ? id : id.slice(i + 1); }

  function renderGraph(g) {
    var nodes = g.nodes.map(function (n) {
      var old = known[n.id] || {x: W / 2 + (Math.random() - 0.5) * 200, y: H / 2 + (Math.random() - 0.5) * 100};
      var node = {id: n.id, x: old.x, y: old.y, px: old.x, py: old.y};
      known[n.id] = node;
      return node;
    });
    var byId = {};
    nodes.forEach(function (n) { byId[n.id] = n; });
    var links = g.edges.map(function (e) {
      return {source: byId[e.source], target: byId[e.target], edge: e};
    });
    force.nodes(nodes).links(links);

    var link = linkLayer.selectAll("g.edge").data(links, function (d) {
      return d.edge.source + ">" + d.edge.target + ":" + d.edge.protocol;
    });
    var entered = link.enter().append("g");
    entered.append("line").attr("marker-end", "url(#arrow)");
    entered.append("text").attr("text-anchor", "middle");
    link.exit().remove();
    link.attr("class", function (d) {
      var e = d.edge;
      return "edge" + (e.mtls ? " mtls" : " plain") + (e.error_rate > 0.05 ? " errors" : "") +
        (e.rps > 0 ? "" : " idle");
    }).attr("data-source", function (d) { return d.edge.source; })
      .attr("data-target", function (d) { return d.edge.target; })
      .attr("data-protocol", function (d) { return d.edge.protocol; })
      .attr("data-rps", function (d) { return d.edge.rps; })
      .attr("data-mtls", function (d) { return d.edge.mtls; })
      .on("click", function (d) { select(this); showConfig(d.edge.target, d.edge); });
    link.select("text").text(function (d) { return edgeLabel(d.edge); });

    var node = nodeLayer.selectAll("g.node").data(nodes, function (d) { return d.id; });
    var nentered = node.enter().append("g").call(force.drag);
    nentered.append("circle").attr("r", 14);
    nentered.append("text").attr("dy", 28).attr("text-anchor", "middle");
    node.exit().remove();
    node.attr("class", function (d) { return "node" + (d.id === "unknown" ? " unknown" : ""); })
      .attr("data-id", function (d) { return d.id; })
      .on("click", function (d) { select(this); showConfig(d.id, null); });
    node.select("text").text(function (d) { return d.id; });

    force.on("tick", function () {
      nodes.forEach(function (n) {
        n.x = Math.max(30, Math.min(W - 30, n.x)); n.y = Math.max(20, Math.min(H - 35, n.y));
      });
      link.select("line").attr("x1", function (d) { return d.source.x; })
        .attr("y1", function (d) { return d.source.y; })
        .attr("x2", function (d) { return d.target.x; })
        .attr("y2", function (d) { return d.target.y; });
      link.select("text").attr("x", function (d) { return (d.source.x + d.target.x) / 2; })
        .attr("y", function (d) { return (d.source.y + d.target.y) / 2 - 6; });
      node.attr("transform", function (d) { return "translate(" + d.x + "," + d.y + ")"; });
    });
    force.start();
  }

  function select(elem) {
    d3.selectAll(".selected").classed("selected", false);
    d3.select(elem).classed("selected", true);
  }

  function showConfig(id, edge) {
    var d = document.getElementById("detail");
    d.textContent = "";
    var i = id.indexOf("/");
    if (i < 0) { d.appendChild(el("p", {"class": "muted"}, "Traffic from outside the mesh: no objects.")); return; }
    d.appendChild(el("h3", {}, edge ? (edge.source + " → " + edge.target) : id));
    if (edge) d.appendChild(el("p", {}, edge.protocol.toUpperCase() + " " + edgeLabel(edge) +
      (edge.service && edge.service !== "unknown" ? " — service " + edge.service : "")));
    fetch("/api/config?" + q + "&ns=" + encodeURIComponent(id.slice(0, i)) +
          "&workload=" + encodeURIComponent(id.slice(i + 1)))
      .then(function (r) { return r.json(); })
      .then(function (c) {
        d.appendChild(el("p", {}, "Pods: " + (c.pods.join(", ") || "none") +
                                  ". Services: " + (c.services.join(", ") || "none") + "."));
        [["VirtualServices", c.virtualServices], ["DestinationRules", c.destinationRules],
         ["AuthorizationPolicies", c.authorizationPolicies]].forEach(function (pair) {
          d.appendChild(el("h4", {}, pair[0] + " (" + pair[1].length + ")"));
          pair[1].forEach(function (o) {
            d.appendChild(el("pre", {"class": "config"}, o.namespace + "/" + o.name + "\n" +
                                                          JSON.stringify(o.spec, null, 1)));
          });
        });
      });
  }

  // -- live updates --
  var status = document.getElementById("status");
  var source = new EventSource("/api/stream?" + q);
  source.addEventListener("state", function (m) { renderState(JSON.parse(m.data)); });
  source.addEventListener("graph", function (m) { renderGraph(JSON.parse(m.data)); });
  source.onopen = function () { status.textContent = "live"; status.className = "status live"; };
  source.onerror = function () { status.textContent = "reconnecting…"; status.className = "status"; };
})();
