//! The egui window (eframe, glow renderer): a PoP table, the channel list with Play/Stop, and
//! per-stream status. The GUI thread only reads the engine's latest [`Snapshot`] (a `watch`
//! channel: never blocks) and sends [`Command`]s; a small task on the tokio runtime wakes the
//! GUI (`request_repaint`) whenever a new snapshot is published, egui_demo_app style.

use crate::core::{PopStatus, Snapshot};
use crate::engine::{Command, EngineHandles};
use eframe::egui;
use tokio_util::sync::CancellationToken;

/// The window's state.
pub struct ClientApp {
    handles: EngineHandles,
    shutdown: CancellationToken,
    closing: bool,
}

/// Opens the window and runs it on the current (main) thread until it is closed or `shutdown`
/// is cancelled. `rt` runs the repaint task.
pub fn run(
    handles: EngineHandles,
    shutdown: CancellationToken,
    rt: tokio::runtime::Handle,
) -> Result<(), eframe::Error> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Pessi Streamer")
            .with_inner_size([760.0, 520.0]),
        ..Default::default()
    };
    eframe::run_native(
        "Pessi Streamer",
        options,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let mut rx = handles.snapshot.clone();
            let stop = shutdown.clone();
            rt.spawn(async move {
                loop {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { break },
                        _ = stop.cancelled() => break,
                    }
                    ctx.request_repaint();
                }
                // Wake the GUI once more so it sees the shutdown and closes.
                ctx.request_repaint();
            });
            Ok(Box::new(ClientApp {
                handles,
                shutdown,
                closing: false,
            }))
        }),
    )
}

impl eframe::App for ClientApp {
    fn update(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        if self.shutdown.is_cancelled() && !self.closing {
            self.closing = true;
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        let snap: Snapshot = self.handles.snapshot.borrow().clone();
        egui::TopBottomPanel::bottom("notices").show(ctx, |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("up {:.0} s", snap.uptime.as_secs_f64()));
                for n in &snap.notices {
                    ui.separator();
                    ui.colored_label(egui::Color32::from_rgb(220, 120, 0), n);
                }
            });
        });
        egui::CentralPanel::default().show(ctx, |ui| {
            for p in &snap.problems {
                ui.colored_label(egui::Color32::from_rgb(220, 40, 40), format!("Error: {p}"));
            }
            ui.heading("Points of presence");
            egui::Grid::new("pops").striped(true).show(ui, |ui| {
                ui.strong("address");
                ui.strong("RTT");
                ui.strong("status");
                ui.strong("channels");
                ui.end_row();
                for p in &snap.pops {
                    ui.monospace(p.addr.to_string());
                    ui.label(match p.rtt {
                        Some(r) => format!("{:.2} ms", r.as_secs_f64() * 1e3),
                        None => "—".into(),
                    });
                    let (text, color) = match p.status {
                        PopStatus::Up => ("up", egui::Color32::from_rgb(40, 160, 60)),
                        PopStatus::Down => ("down", egui::Color32::from_rgb(200, 50, 50)),
                        PopStatus::Unknown => ("…", egui::Color32::GRAY),
                    };
                    ui.colored_label(color, text);
                    ui.label(p.channels.to_string());
                    ui.end_row();
                }
            });
            ui.separator();
            ui.heading("Channels");
            if snap.channels.is_empty() && snap.streams.is_empty() {
                ui.label("no channel listed by a live PoP yet");
            }
            let mut names: Vec<&String> = snap.channels.iter().collect();
            for s in &snap.streams {
                if !snap.channels.contains(&s.name) {
                    names.push(&s.name);
                }
            }
            egui::Grid::new("channels").striped(true).show(ui, |ui| {
                ui.strong("channel");
                ui.strong("");
                ui.strong("PoP");
                ui.strong("packets");
                ui.strong("lost");
                ui.strong("recovered")
                    .on_hover_text("datagrams NACKed and retransmitted in time / arrived too late");
                ui.strong("source changes");
                ui.end_row();
                for name in names {
                    ui.label(name);
                    match snap.streams.iter().find(|s| &s.name == name) {
                        Some(s) => {
                            if ui.button("Stop").clicked() {
                                let _ = self.handles.commands.send(Command::Stop(name.clone()));
                            }
                            ui.monospace(if s.pops.is_empty() {
                                "waiting…".to_string()
                            } else {
                                // Primary first; a second one with --redundancy 2.
                                s.pops
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()
                                    .join(" + ")
                            });
                            ui.label(s.packets.to_string());
                            ui.label(format!("{} (TS {})", s.lost, s.cc_lost));
                            ui.label(format!("{} / late {}", s.playout.recovered, s.playout.late));
                            ui.label(s.source_changes.to_string());
                        }
                        None => {
                            if ui.button("Play").clicked() {
                                let _ = self.handles.commands.send(Command::Play(name.clone()));
                            }
                            for _ in 0..5 {
                                ui.label("");
                            }
                        }
                    }
                    ui.end_row();
                }
            });
        });
    }
}
