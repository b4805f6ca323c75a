/* shared by refbuild/report_template.html and model/report_template.html; D.pageSize sets the page size */
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

// One pager for every gallery: `filter` picks rows, `order` (optional) sorts them, `card` draws one.
// Needs #<prefix>-gallery, -page, -count, -prev, -next; returns the function that refilters.
function gallery(prefix, rows, filter, card, order) {
  const state = { page: 0, shown: rows };
  const g = document.getElementById(prefix + "-gallery");
  const size = D.pageSize;
  function draw() {
    const pages = Math.max(1, Math.ceil(state.shown.length / size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    const slice = state.shown.slice(state.page * size, (state.page + 1) * size);
    g.replaceChildren(...slice.map(card));
    if (!slice.length) g.append(el("p", "empty", "nothing matches"));
    document.getElementById(prefix + "-page").textContent = "page " + (state.page + 1) + " of " + pages;
    document.getElementById(prefix + "-count").textContent =
      state.shown.length.toLocaleString() + " of " + rows.length.toLocaleString();
    document.getElementById(prefix + "-prev").disabled = state.page === 0;
    document.getElementById(prefix + "-next").disabled = state.page >= pages - 1;
    g.dataset.total = state.shown.length;
    g.dataset.page = state.page;
  }
  function refilter() {
    state.shown = rows.filter(filter);
    if (order) state.shown.sort(order);
    state.page = 0;
    draw();
  }
  document.getElementById(prefix + "-prev").onclick = () => { state.page--; draw(); };
  document.getElementById(prefix + "-next").onclick = () => { state.page++; draw(); };
  draw();
  return refilter;
}
