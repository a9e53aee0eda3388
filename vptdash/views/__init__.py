"""Views: results turned into decisions, figures, words and reports (recommendation and Pareto
front, plotly figures, the HTML report). Computation lives below; no Streamlit here."""
