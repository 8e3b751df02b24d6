// Parca Agent UI. Every label, process name and function name is chosen by whoever runs a
// process, so this script only ever puts data into the page with textContent and DOM
// attributes, never as HTML. The page's Content-Security-Policy forbids inline scripts.
'use strict';

(function () {
  const REFRESH_MS = 3000;

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === 'text') node.textContent = value;
      else if (key === 'className') node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  // Only our own paths may become links: a value from the wire never sets an href scheme.
  function safePath(path) {
    return typeof path === 'string' && path.startsWith('/') && !path.startsWith('//') ? path : '#';
  }

  function ago(seconds) {
    if (seconds == null) return 'never';
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + 's ago';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's ago';
    return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm ago';
  }

  function number(n, digits) {
    if (n == null) return '—';
    return n.toLocaleString('en-US', { maximumFractionDigits: digits || 0 });
  }

  function percent(part, total) {
    return total > 0 ? (100 * part / total).toFixed(2) + '%' : '—';
  }

  function quantity(value, unit) {
    if (value === 0) return '0';
    if (unit === 'nanoseconds') {
      if (value >= 1e9) return (value / 1e9).toFixed(2) + ' s';
      if (value >= 1e6) return (value / 1e6).toFixed(2) + ' ms';
      return (value / 1e3).toFixed(1) + ' µs';
    }
    return number(value) + (unit === 'count' || !unit ? ' samples' : ' ' + unit);
  }

  function labelChips(labels) {
    const box = el('span', { className: 'labels' });
    const names = Object.keys(labels || {}).filter((k) => k !== '__name__').sort();
    for (const name of names) {
      box.append(el('span', { className: 'chip' }, [
        el('span', { className: 'chip-name', text: name }), '=',
        el('span', { className: 'chip-value', text: String(labels[name]) }),
      ]));
    }
    if (!names.length) box.append(el('span', { className: 'muted', text: 'no labels' }));
    return box;
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: 'no-store' });
    if (!response.ok) throw new Error((await response.text()).trim() || String(response.status));
    return response.json();
  }

  // ---- the profilers page ------------------------------------------------------------------

  function initIndex() {
    const targetsBody = document.querySelector('#targets tbody');
    const servicesBody = document.querySelector('#services tbody');
    const status = document.getElementById('targets-status');
    const openDetails = new Set();
    let skew = 0; // server clock minus ours, so "3s ago" is right on a skewed client

    function serverNow() { return Date.now() / 1000 + skew; }

    function tickAges() {
      for (const cell of document.querySelectorAll('[data-time]')) {
        const t = Number(cell.dataset.time);
        cell.textContent = t ? ago(serverNow() - t) : 'never';
      }
    }

    function targetRow(t) {
      const error = t.error ? el('span', { className: 'error', text: t.error }) : el('span', { className: 'muted', text: '—' });
      return el('tr', { 'data-target-id': String(t.id) }, [
        el('td', {}, [el('span', { className: 'type', text: t.profile_type || 'parca_agent_cpu' })]),
        el('td', {}, [labelChips(t.labels)]),
        el('td', { className: 'age', 'data-time': String(t.last_profile_time || 0) }),
        el('td', {}, [error]),
        el('td', {}, [el('a', { className: 'button small', href: safePath(t.page_url), text: 'Show Profile' })]),
      ]);
    }

    function serviceRow(s) {
      const state = s.alive ? 'alive' : (s.last_heartbeat ? 'down' : 'not seen');
      const details = el('details', {}, [el('summary', { text: s.metrics.length + (s.metrics.length === 1 ? ' metric' : ' metrics') })]);
      if (openDetails.has(s.service)) details.open = true;
      details.addEventListener('toggle', () => {
        if (details.open) openDetails.add(s.service); else openDetails.delete(s.service);
      });
      const list = el('ul', { className: 'metric-list' });
      for (const m of s.metrics.slice().sort((a, b) => a.name.localeCompare(b.name))) {
        const labels = Object.entries(m.labels).map(([k, v]) => k + '="' + v + '"').join(', ');
        list.append(el('li', {}, [
          el('span', { className: 'metric-name', text: m.name + (labels ? '{' + labels + '}' : '') }),
          el('span', { className: 'metric-value', text: number(m.value, 3) }),
        ]));
      }
      details.append(list);
      return el('tr', { 'data-service': s.service }, [
        el('td', { className: 'service-name', text: s.service }),
        el('td', {}, [el('span', { className: 'pill ' + state.replace(' ', '-'), text: state })]),
        el('td', { className: 'age', 'data-time': String(s.last_heartbeat || 0) }),
        el('td', { text: s.pid == null ? '—' : String(s.pid) }),
        el('td', { className: 'num', text: number(s.samples_per_second, 1) }),
        el('td', { className: 'num', text: number(s.drops) }),
        el('td', { className: 'num', text: number(s.stack_errors) }),
        el('td', { className: 'num', text: number(s.malformed) }),
        el('td', {}, [s.metrics.length ? details : el('span', { className: 'muted', text: '—' })]),
      ]);
    }

    async function refresh() {
      try {
        const [targets, services] = await Promise.all([getJSON('/api/targets'), getJSON('/api/services')]);
        skew = targets.now - Date.now() / 1000;
        const rows = targets.targets.map(targetRow);
        if (!rows.length) {
          rows.push(el('tr', { className: 'empty' }, [el('td', { colspan: '5', text: 'No profiles yet: the first arrive one window after the agent starts.' })]));
        }
        targetsBody.replaceChildren(...rows);
        servicesBody.replaceChildren(...services.services.map(serviceRow));
        tickAges();
        status.classList.remove('error');
        status.textContent = targets.targets.length + ' target' + (targets.targets.length === 1 ? '' : 's') + ' · refreshed every ' + REFRESH_MS / 1000 + ' s';
      } catch (e) {
        status.classList.add('error');
        status.textContent = 'cannot reach the agent: ' + e.message;
      }
    }

    refresh();
    setInterval(refresh, REFRESH_MS);
    setInterval(tickAges, 1000);
  }

  // ---- the profile page --------------------------------------------------------------------

  function initTarget() {
    const section = document.getElementById('profile');
    const targetId = section.dataset.targetId;
    const chartBox = document.getElementById('flamegraph');
    const details = document.getElementById('details');
    const range = document.getElementById('range');
    const search = document.getElementById('search');
    const summary = document.getElementById('profile-summary');
    const errorBox = document.getElementById('profile-error');
    const download = document.getElementById('download');
    const topBody = document.querySelector('#top tbody');
    const hint = details.textContent;
    let data = null;
    let chart = null;
    let searchInfo = '';
    let sortKey = 'flat';

    function frameLabel(d) {
      return d.data.name + ' — ' + percent(d.data.value, data.total) + ' of the total, ' + quantity(d.data.value, data.unit);
    }

    function draw() {
      chartBox.replaceChildren();
      if (!data || !data.total) {
        chartBox.append(el('p', { className: 'muted empty-chart', text: 'No samples in this range.' }));
        return;
      }
      chart = flamegraph()
        .width(Math.max(320, chartBox.clientWidth))
        .cellHeight(20)
        .transitionDuration(300)
        .minFrameSize(1)
        .setLabelHandler(frameLabel)
        // Plain case-insensitive substring: the library's default compiles the term as a RegExp.
        .setSearchMatch((d, term) => Boolean(term) && d.data.name.toLowerCase().includes(term.toLowerCase()))
        .setSearchHandler((results) => {
          // Share of the whole profile, whatever the zoom: a match inside a match counts once.
          const matched = new Set(results);
          const outermost = results.filter((d) => d.ancestors().slice(1).every((a) => !matched.has(a)));
          const sum = outermost.reduce((acc, d) => acc + d.data.value, 0);
          searchInfo = results.length
            ? 'search: ' + results.length + (results.length === 1 ? ' frame, ' : ' frames, ') + percent(sum, data.total) + ' of the total'
            : 'search: no match';
        })
        .setDetailsHandler((text) => { details.textContent = text || searchInfo || hint; });
      d3.select(chartBox).datum(data.flamegraph).call(chart);
      applySearch();
    }

    function applySearch() {
      if (!chart) return;
      if (search.value.trim()) {
        chart.search(search.value.trim());
      } else {
        searchInfo = '';
        chart.clear();
      }
      details.textContent = searchInfo || hint;
    }

    function renderTop() {
      const rows = (data ? data.top : []).slice();
      rows.sort((a, b) => sortKey === 'name' ? a.name.localeCompare(b.name) : b[sortKey] - a[sortKey]);
      for (const th of document.querySelectorAll('#top th[data-sort]')) {
        th.classList.toggle('sorted', th.dataset.sort === sortKey);
      }
      topBody.replaceChildren(...rows.map((r) => {
        const row = el('tr', { className: 'clickable', title: 'highlight in the flame graph' }, [
          el('td', { className: 'function', text: r.name }),
          el('td', { className: 'num', text: quantity(r.flat, data.unit) }),
          el('td', { className: 'num', text: percent(r.flat, data.total) }),
          el('td', { className: 'num', text: quantity(r.cum, data.unit) }),
          el('td', { className: 'num', text: percent(r.cum, data.total) }),
        ]);
        row.addEventListener('click', () => { search.value = r.name; applySearch(); window.scrollTo({ top: 0, behavior: 'smooth' }); });
        return row;
      }));
    }

    async function load() {
      summary.textContent = 'loading…';
      errorBox.hidden = true;
      try {
        data = await getJSON('/api/flamegraph/' + encodeURIComponent(targetId) + '?range=' + encodeURIComponent(range.value));
      } catch (e) {
        data = null;
        errorBox.textContent = 'Cannot load the profile: ' + e.message;
        errorBox.hidden = false;
        summary.textContent = '';
        draw();
        renderTop();
        return;
      }
      download.href = safePath(data.download_url);
      const start = new Date(data.start_time * 1000).toLocaleTimeString();
      const end = new Date(data.end_time * 1000).toLocaleTimeString();
      summary.textContent = data.windows + ' window' + (data.windows === 1 ? '' : 's') + ', ' + start + ' – ' + end + ' · ' + quantity(data.total, data.unit) + ' (' + data.sample_type + ')';
      draw();
      renderTop();
    }

    range.addEventListener('change', load);
    document.getElementById('reload').addEventListener('click', load);
    document.getElementById('reset-zoom').addEventListener('click', () => { if (chart) chart.resetZoom(); });
    let searchTimer = null;
    search.addEventListener('input', () => { clearTimeout(searchTimer); searchTimer = setTimeout(applySearch, 150); });
    for (const th of document.querySelectorAll('#top th[data-sort]')) {
      th.addEventListener('click', () => { sortKey = th.dataset.sort; renderTop(); });
    }
    let drawnWidth = chartBox.clientWidth;
    let resizeTimer = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (chartBox.clientWidth !== drawnWidth) { drawnWidth = chartBox.clientWidth; draw(); }
      }, 250);
    });
    load();
  }

  const page = document.body.dataset.page;
  if (page === 'index') initIndex();
  else if (page === 'target') initTarget();
})();
